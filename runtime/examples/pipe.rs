//! The tutorial's Pipe example: a child sends, the parent receives.
//!
//! Python:
//! ```python
//! def f(conn):
//!     conn.send([38, None, "hello"]); conn.close()
//! if __name__ == "__main__":
//!     parent_conn, child_conn = Pipe()
//!     p = Process(target=f, args=(child_conn,)); p.start()
//!     print(parent_conn.recv()); p.join()
//! ```
use multiproc::connection::Connection;
use multiproc::{Pipe, Process, process_fn};

#[process_fn]
fn f(conn: Connection<(u32, String, String)>) {
    conn.send(&(38, "snake".to_string(), "hello".to_string()))
        .ok();
    conn.close();
}

#[multiproc::main]
fn main() -> multiproc::Result<()> {
    let (mut parent_conn, child_conn) = Pipe::new()?;
    let mut p = Process::new(f, (child_conn,));
    p.start()?;
    println!("{:?}", parent_conn.recv()?);
    p.join()?;
    Ok(())
}
