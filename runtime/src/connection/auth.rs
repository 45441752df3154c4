//! The authentication handshake of a [`Listener`](super::Listener) and a
//! [`Client`](super::Client): CPython's `deliver_challenge` and
//! `answer_challenge` (`Lib/multiprocessing/connection.py`), with
//! HMAC-SHA256 where CPython 3.11 uses HMAC-MD5 (3.12 moved to SHA-256
//! too, with the same `{sha256}` prefix on challenge and response).
//!
//! Each side proves that it knows the key without sending it: the
//! deliverer sends `#CHALLENGE#{sha256}` and 40 random bytes, the
//! answerer sends back `{sha256}` and the HMAC-SHA256 of what followed
//! `#CHALLENGE#` under the key, and the deliverer compares it with its own
//! (in constant time, `hmac`'s `verify_slice`) and answers `#WELCOME#` or
//! `#FAILURE#`. The accepting side delivers first, then answers; the
//! connecting side answers first, then delivers: both have proved it
//! before either hands the connection out. A wrong key is
//! [`Error::AuthenticationError`] on both sides (the side that found it
//! out sends `#FAILURE#` first, so the other knows).
//!
//! Every handshake message is one frame of [`Channel`] with the tag
//! [`TAG`], read with a limit of [`MAX_MESSAGE`] bytes (CPython's
//! `recv_bytes(256)`; a header announcing more ends the handshake at once,
//! nothing allocated) and within one deadline for the whole handshake. So
//! nothing an unauthenticated peer sends reaches a user's decoder: its
//! bytes are only ever compared with a challenge prefix or a digest.
//! Descriptors it attached (on a Unix socket) are closed.

use std::time::Instant;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::error::{Error, Result};
use crate::sys;
use crate::wire::{self, Channel};

/// The tag of a handshake frame (`"AUTH"`): a user's message never has it.
pub(crate) const TAG: u32 = u32::from_le_bytes(*b"AUTH");

/// The largest handshake message read (CPython's `recv_bytes(256)`).
const MAX_MESSAGE: u64 = 256;

const CHALLENGE: &[u8] = b"#CHALLENGE#";
const WELCOME: &[u8] = b"#WELCOME#";
const FAILURE: &[u8] = b"#FAILURE#";
/// The digest's name, before the random bytes and before the response.
const DIGEST: &[u8] = b"{sha256}";
/// Random bytes in a challenge (CPython 3.12's `MESSAGE_LENGTH`).
const NONCE: usize = 40;
/// Fewest random bytes an answerer accepts in a challenge.
const MIN_NONCE: usize = 20;

type HmacSha256 = Hmac<Sha256>;

fn refused(message: impl Into<String>) -> Error {
    Error::AuthenticationError {
        message: message.into(),
    }
}

fn mac(key: &[u8], message: &[u8]) -> Result<HmacSha256> {
    // HMAC takes a key of any length (a long one is hashed first): this
    // never fails.
    let mut mac = <HmacSha256 as Mac>::new_from_slice(key)
        .map_err(|_| Error::invalid("an HMAC key was refused"))?;
    mac.update(message);
    Ok(mac)
}

/// The HMAC-SHA256 of `message` under `key`, `{sha256}`-prefixed: what an
/// answerer sends.
fn response(key: &[u8], message: &[u8]) -> Result<Vec<u8>> {
    let mut out = DIGEST.to_vec();
    out.extend_from_slice(&mac(key, message)?.finalize().into_bytes());
    Ok(out)
}

/// Sends one handshake message.
fn send(channel: &Channel, message: &[u8]) -> Result<()> {
    channel.send(TAG, &[message], &[])
}

/// Receives one handshake message by `deadline`. A peer that breaks the
/// handshake's rules (a larger message, another tag, descriptors, bytes
/// that are no frame) is an [`Error::AuthenticationError`]; one that
/// stays silent is [`Error::Timeout`], one that leaves
/// [`Error::Disconnected`].
fn recv(channel: &mut Channel, deadline: Option<Instant>) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    let mut fds = Vec::new();
    let got = channel.recv_into(&mut bytes, &mut fds, wire::remaining(deadline));
    let tag = match got {
        Ok(tag) => tag,
        Err(e @ (Error::Timeout | Error::Disconnected)) => return Err(e),
        Err(Error::MessageTooLarge { size, .. }) => {
            return Err(refused(format!(
                "the peer sent a handshake message of {size} bytes (at most {MAX_MESSAGE}): \
                 it does not speak this protocol"
            )));
        }
        Err(e) => {
            return Err(refused(format!(
                "the peer's handshake message is not one: {e}"
            )));
        }
    };
    if !fds.is_empty() {
        return Err(refused(
            "the peer attached descriptors to a handshake message",
        ));
    }
    if tag != TAG {
        return Err(refused(
            "the peer sent a message where the handshake expected its challenge or response \
             (does it use an authkey?)",
        ));
    }
    Ok(bytes)
}

/// CPython's `deliver_challenge`: checks that the peer knows `key`.
fn deliver_challenge(channel: &mut Channel, key: &[u8], deadline: Option<Instant>) -> Result<()> {
    let mut nonce = DIGEST.to_vec();
    let mut random = [0u8; NONCE];
    sys::random_bytes(&mut random).map_err(|e| Error::io("could not make a challenge", e))?;
    nonce.extend_from_slice(&random);
    let mut challenge = CHALLENGE.to_vec();
    challenge.extend_from_slice(&nonce);
    send(channel, &challenge)?;
    let answer = recv(channel, deadline)?;
    let expected = mac(key, &nonce)?;
    // `verify_slice` compares in constant time.
    let right = answer
        .strip_prefix(DIGEST)
        .is_some_and(|digest| expected.verify_slice(digest).is_ok());
    if right {
        send(channel, WELCOME)
    } else {
        // The peer is told before this side gives up (it may be gone).
        let _ = send(channel, FAILURE);
        Err(refused(
            "the digest the peer sent was wrong: it does not know the authkey",
        ))
    }
}

/// CPython's `answer_challenge`: proves to the peer that this side knows
/// `key`.
fn answer_challenge(channel: &mut Channel, key: &[u8], deadline: Option<Instant>) -> Result<()> {
    let message = recv(channel, deadline)?;
    let Some(nonce) = message.strip_prefix(CHALLENGE) else {
        return Err(refused(
            "the peer's first message is not a challenge (does it use an authkey?)",
        ));
    };
    let random = nonce
        .strip_prefix(DIGEST)
        .ok_or_else(|| refused("the peer's challenge names a digest other than {sha256}"))?;
    if random.len() < MIN_NONCE {
        return Err(refused(format!(
            "the peer's challenge has {} random bytes (at least {MIN_NONCE})",
            random.len()
        )));
    }
    send(channel, &response(key, nonce)?)?;
    let verdict = recv(channel, deadline)?;
    if verdict == WELCOME {
        Ok(())
    } else if verdict == FAILURE {
        Err(refused(
            "the peer rejected the digest this side sent: the authkeys differ",
        ))
    } else {
        Err(refused("the peer's verdict is neither welcome nor failure"))
    }
}

/// Which side of the connection this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    /// The listener (delivers first).
    Accepting,
    /// The client (answers first).
    Connecting,
}

/// Runs the whole mutual handshake on `channel` by `deadline`. The
/// channel's limits are the handshake's while it runs; the caller resets
/// them ([`Link::socket`](super::link::Link::socket) does).
pub(crate) fn handshake(
    channel: &mut Channel,
    key: &[u8],
    side: Side,
    deadline: Option<Instant>,
) -> Result<()> {
    channel.set_max_frame(MAX_MESSAGE);
    channel.set_strict();
    match side {
        Side::Accepting => {
            deliver_challenge(channel, key, deadline)?;
            answer_challenge(channel, key, deadline)
        }
        Side::Connecting => {
            answer_challenge(channel, key, deadline)?;
            deliver_challenge(channel, key, deadline)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn deadline() -> Option<Instant> {
        wire::deadline(Some(Duration::from_secs(10)))
    }

    fn pair() -> (Channel, Channel) {
        let (a, b) = sys::socketpair().expect("socketpair");
        (Channel::new(a), Channel::new(b))
    }

    /// Runs the accepting side on a thread, the connecting side here.
    fn run(server_key: &'static [u8], client_key: &'static [u8]) -> (Result<()>, Result<()>) {
        let (mut a, mut b) = pair();
        let t =
            std::thread::spawn(move || handshake(&mut a, server_key, Side::Accepting, deadline()));
        let client = handshake(&mut b, client_key, Side::Connecting, deadline());
        let server = t.join().expect("server thread");
        (server, client)
    }

    #[test]
    fn the_same_key_passes_on_both_sides() {
        let (server, client) = run(b"secret", b"secret");
        server.expect("server");
        client.expect("client");
    }

    #[test]
    fn a_wrong_key_is_an_authentication_error_on_both_sides() {
        let (server, client) = run(b"secret", b"guess");
        assert!(server.expect_err("server").is_authentication_error());
        assert!(client.expect_err("client").is_authentication_error());
    }

    #[test]
    fn the_response_is_the_hmac_sha256_of_the_challenge() {
        // RFC 4231 test case 2.
        let digest = response(b"Jefe", b"what do ya want for nothing?").expect("hmac");
        let hex: String = digest[DIGEST.len()..]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(
            hex,
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn a_peer_that_answers_with_no_challenge_is_refused() {
        let (mut a, b) = pair();
        b.send(TAG, &[b"hello"], &[]).expect("send");
        let err = answer_challenge(&mut a, b"k", deadline()).expect_err("no challenge");
        assert!(err.is_authentication_error(), "{err}");
        // A user's frame (another tag) is refused too.
        let (mut a, b) = pair();
        b.send(1, &[b"#CHALLENGE#{sha256}0123456789012345678901234"], &[])
            .expect("send");
        let err = answer_challenge(&mut a, b"k", deadline()).expect_err("wrong tag");
        assert!(err.is_authentication_error(), "{err}");
    }
}
