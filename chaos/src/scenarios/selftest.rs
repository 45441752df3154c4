//! The harness's own checks, one deliberate fault each: they prove that
//! every column of the table sees what it claims to. Not part of the
//! matrix; run them with `--only selftest/` (each row must read *not*
//! ok, in the column its name gives).
use std::time::Duration;

use super::Scenario;
use crate::ctx::{Context, Ctx, Res};

pub fn scenarios() -> Vec<Scenario> {
    vec![
        Scenario {
            name: "selftest/panic",
            run: |_| panic!("a deliberate panic"),
        },
        Scenario {
            name: "selftest/abort",
            run: |_| std::process::abort(),
        },
        Scenario {
            name: "selftest/hang-caught-by-the-watchdog",
            run: watchdog_hang,
        },
        Scenario {
            name: "selftest/hang-caught-by-a-bounded-wait",
            run: bounded_hang,
        },
        Scenario {
            name: "selftest/lost-duplicated-torn",
            run: data,
        },
        Scenario {
            name: "selftest/leaked-fd",
            run: leak_fd,
        },
        Scenario {
            name: "selftest/leaked-memfd",
            run: leak_memfd,
        },
        Scenario {
            name: "selftest/zombie",
            run: zombie,
        },
        Scenario {
            name: "selftest/orphan",
            run: orphan,
        },
    ]
}

fn watchdog_hang(_: &mut Ctx) -> Res {
    std::thread::sleep(Duration::from_secs(3600));
    Ok(())
}

fn bounded_hang(ctx: &mut Ctx) -> Res {
    ctx.within(Duration::from_secs(1), "a deliberate sleep", || {
        std::thread::sleep(Duration::from_secs(5));
    })
}

fn data(ctx: &mut Ctx) -> Res {
    ctx.lose(1, || "deliberately".into());
    ctx.duplicate(1, || "deliberately".into());
    ctx.tear(1, || "deliberately".into());
    Ok(())
}

fn leak_fd(_: &mut Ctx) -> Res {
    std::mem::forget(std::fs::File::open("/dev/null").ctx("open")?);
    Ok(())
}

fn leak_memfd(_: &mut Ctx) -> Res {
    let fd = nix::sys::memfd::memfd_create(c"selftest", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
        .ctx("memfd")?;
    std::mem::forget(fd);
    Ok(())
}

fn zombie(_: &mut Ctx) -> Res {
    let child = std::process::Command::new("/bin/true")
        .spawn()
        .ctx("spawn")?;
    std::mem::forget(child);
    std::thread::sleep(Duration::from_millis(200));
    Ok(())
}

fn orphan(_: &mut Ctx) -> Res {
    let child = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .ctx("spawn")?;
    std::mem::forget(child);
    Ok(())
}
