//! Two programs over TCP with an authkey: Python's
//! `multiprocessing.connection.Listener` and `Client`.
//!
//! `cargo run --example listener_client` is the server: it listens on a
//! free port and starts this same binary again as a separate program, the
//! client (`listener_client client ADDRESS`, the key in the environment
//! as hex). On two machines, start the client side there by hand with the
//! server's address and key.
use std::time::Duration;

use multiproc::connection::{Address, Client, Connection, Listener};

const KEY_VAR: &str = "LISTENER_CLIENT_KEY";
const WAIT: Duration = Duration::from_secs(30);

fn client(address: Address, key: &[u8]) -> multiproc::Result<()> {
    let mut conn: Connection<String> = Client::connect_timeout(address, Some(key), WAIT)?;
    conn.send(&"hello from the client".to_string())?;
    println!("client got: {}", conn.recv_timeout(WAIT)?);
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() == 3 && args[1] == "client" {
        let hex = std::env::var(KEY_VAR)?;
        let key: Vec<u8> = (0..hex.len() / 2)
            .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16))
            .collect::<Result<_, _>>()?;
        return Ok(client(args[2].parse()?, &key)?);
    }
    let key = multiproc::process::authkey()?; // 32 random bytes
    let mut listener = Listener::bind("127.0.0.1:0".parse::<Address>()?, Some(&key))?;
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    let mut other = std::process::Command::new(std::env::current_exe()?)
        .args(["client", &listener.address().to_string()])
        .env(KEY_VAR, hex)
        .spawn()?;
    let mut conn: Connection<String> = listener.accept_timeout(WAIT)?;
    let peer = listener.last_accepted().map(ToString::to_string);
    println!("server got: {} (from {peer:?})", conn.recv_timeout(WAIT)?);
    conn.send(&"hello from the server".to_string())?;
    let status = other.wait()?;
    if !status.success() {
        return Err(format!("the client program failed: {status}").into());
    }
    Ok(())
}
