use multiproc::ProcessTask;

#[derive(ProcessTask)]
union Bits {
    int: u32,
    float: f32,
}

fn main() {}
