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
//! nothing allocated) and within one deadline for the whole handshake,
//! byte-exact (header, then payload), so that what the peer sends after
//! the handshake stays in the socket for the connection. So
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
/// Bytes of a frame header (see [`crate::wire`]).
const HEADER: usize = 16;

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

/// Fills `buf` from the channel's socket by `deadline`, reading no byte
/// past it: what the peer sends after its last handshake message is its
/// first message, left in the socket for the connection (which may move
/// to another process at once).
fn read_exact(channel: &Channel, buf: &mut [u8], deadline: Option<Instant>) -> Result<()> {
    let fd = channel.fd();
    let mut done = 0;
    while done < buf.len() {
        wire::wait_readable(fd, deadline)?;
        let mut fds = Vec::new();
        let got = sys::recv_fds(fd, &mut buf[done..], &mut fds)
            .map_err(|e| Error::transport("recv", e))?;
        if !fds.is_empty() || got.truncated {
            // Dropping them closes them.
            return Err(refused(
                "the peer attached descriptors to a handshake message",
            ));
        }
        if got.bytes == 0 {
            return Err(Error::Disconnected);
        }
        done += got.bytes;
    }
    Ok(())
}

/// Receives one handshake message by `deadline`: a frame header (the wire
/// format's: length, descriptor count, tag), checked before its payload
/// is read. A peer that breaks the handshake's rules (a longer message,
/// another tag, descriptors) is an [`Error::AuthenticationError`] at once;
/// one that stays silent is [`Error::Timeout`], one that leaves
/// [`Error::Disconnected`].
fn recv(channel: &Channel, deadline: Option<Instant>) -> Result<Vec<u8>> {
    let mut head = [0u8; HEADER];
    read_exact(channel, &mut head, deadline)?;
    let mut len = [0u8; 8];
    len.copy_from_slice(&head[..8]);
    let len = u64::from_le_bytes(len);
    let mut word = [0u8; 4];
    word.copy_from_slice(&head[8..12]);
    let nfds = u32::from_le_bytes(word);
    word.copy_from_slice(&head[12..]);
    let tag = u32::from_le_bytes(word);
    if len > MAX_MESSAGE {
        return Err(refused(format!(
            "the peer announced a handshake message of {len} bytes (at most {MAX_MESSAGE}): \
             it does not speak this protocol"
        )));
    }
    if nfds != 0 {
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
    let mut body = vec![0u8; len as usize];
    read_exact(channel, &mut body, deadline)?;
    Ok(body)
}

/// CPython's `deliver_challenge`: checks that the peer knows `key`.
fn deliver_challenge(channel: &Channel, key: &[u8], deadline: Option<Instant>) -> Result<()> {
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
fn answer_challenge(channel: &Channel, key: &[u8], deadline: Option<Instant>) -> Result<()> {
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

/// Runs the whole mutual handshake on `channel` by `deadline`. It reads
/// the socket itself, never past the last handshake message: the
/// channel's buffer is untouched.
pub(crate) fn handshake(
    channel: &Channel,
    key: &[u8],
    side: Side,
    deadline: Option<Instant>,
) -> Result<()> {
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
        let (a, b) = pair();
        let t = std::thread::spawn(move || handshake(&a, server_key, Side::Accepting, deadline()));
        let client = handshake(&b, client_key, Side::Connecting, deadline());
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
    fn a_handshake_message_is_read_without_the_bytes_behind_it() {
        let (a, b) = pair();
        // One write: the peer's last handshake message and its first
        // message to the user.
        let mut both = Vec::new();
        for (tag, body) in [(TAG, WELCOME), (1, &b"user data"[..])] {
            both.extend_from_slice(&(body.len() as u64).to_le_bytes());
            both.extend_from_slice(&0u32.to_le_bytes());
            both.extend_from_slice(&tag.to_le_bytes());
            both.extend_from_slice(body);
        }
        let n = sys::write(b.fd(), &both).expect("write");
        assert_eq!(n, both.len());
        assert_eq!(recv(&a, deadline()).expect("welcome"), WELCOME);
        // The user's frame is still in the socket, not in a buffer.
        assert!(!a.has_buffered_data());
        let mut a = a;
        let frame = a.recv(Some(Duration::from_secs(10))).expect("user frame");
        assert_eq!((frame.tag, &frame.bytes[..]), (1, &b"user data"[..]));
    }

    #[test]
    fn a_peer_that_answers_with_no_challenge_is_refused() {
        let (a, b) = pair();
        b.send(TAG, &[b"hello"], &[]).expect("send");
        let err = answer_challenge(&a, b"k", deadline()).expect_err("no challenge");
        assert!(err.is_authentication_error(), "{err}");
        // A user's frame (another tag) is refused too.
        let (a, b) = pair();
        b.send(1, &[b"#CHALLENGE#{sha256}0123456789012345678901234"], &[])
            .expect("send");
        let err = answer_challenge(&a, b"k", deadline()).expect_err("wrong tag");
        assert!(err.is_authentication_error(), "{err}");
    }
}
