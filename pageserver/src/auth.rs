//! Authentication: both sides prove they know the shared secret before any memory moves, and the
//! opening side's proof covers everything its `Hello` says (purpose, session, VM, layout), so a
//! man in the middle can change none of it.
//!
//! ```text
//! mac_i = HMAC-SHA256(secret, "tsubame-initiator" | nonce_r | Hello payload with mac zeroed)
//! mac_r = HMAC-SHA256(secret, "tsubame-responder" | nonce_i | nonce_r)
//! ```
//! (`nonce_r` is the responder's challenge, `nonce_i` the initiator's, inside its Hello.)

use std::io::Read;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::message::{encode_hello, Hello};

type HmacSha256 = Hmac<Sha256>;

fn mac(secret: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut m = HmacSha256::new_from_slice(secret).expect("HMAC takes keys of any length");
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().into()
}

/// The opening side's proof: binds the responder's challenge and the whole Hello.
pub fn initiator_mac(
    secret: &[u8],
    nonce_r: &[u8; 32],
    version: u32,
    nonce_i: &[u8; 32],
    hello: &Hello,
) -> [u8; 32] {
    let mut payload = Vec::new();
    encode_hello(&mut payload, version, nonce_i, &[0; 32], hello);
    mac(secret, &[b"tsubame-initiator", nonce_r, &payload])
}

/// The answering side's proof.
pub fn responder_mac(secret: &[u8], nonce_i: &[u8; 32], nonce_r: &[u8; 32]) -> [u8; 32] {
    mac(secret, &[b"tsubame-responder", nonce_i, nonce_r])
}

/// Compares two MACs in constant time.
pub fn mac_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// 32 random bytes from the kernel, for nonces and identities.
pub fn nonce() -> Result<[u8; 32], std::io::Error> {
    let mut n = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut n)?;
    Ok(n)
}

/// A random 64-bit number (session and VM identities).
pub fn random_u64() -> Result<u64, std::io::Error> {
    Ok(u64::from_le_bytes(
        nonce()?[..8].try_into().expect("8 bytes"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{Channel, Purpose};
    use tsubame_pages::MemoryLayout;

    #[test]
    fn macs_bind_both_nonces_the_secret_and_the_hello() {
        let hello = Hello {
            purpose: Purpose::Migrate,
            channel: Channel::Urgent,
            session: 7,
            vm: 9,
            layout: MemoryLayout::for_size(64 << 20).unwrap(),
            vcpus: 1,
            checkpoint_ms: 0,
        };
        let (r, i) = ([1u8; 32], [2u8; 32]);
        let a = initiator_mac(b"secret", &r, 5, &i, &hello);
        assert!(mac_eq(&a, &initiator_mac(b"secret", &r, 5, &i, &hello)));
        assert!(!mac_eq(&a, &initiator_mac(b"Secret", &r, 5, &i, &hello)));
        assert!(!mac_eq(&a, &initiator_mac(b"secret", &i, 5, &r, &hello)));
        for changed in [
            Hello {
                channel: Channel::Bulk,
                ..hello.clone()
            },
            Hello {
                purpose: Purpose::Fetch,
                ..hello.clone()
            },
            Hello {
                vm: 10,
                ..hello.clone()
            },
            Hello {
                layout: MemoryLayout::for_size(128 << 20).unwrap(),
                ..hello.clone()
            },
        ] {
            assert!(!mac_eq(&a, &initiator_mac(b"secret", &r, 5, &i, &changed)));
        }
        assert!(!mac_eq(
            &responder_mac(b"secret", &i, &r),
            &responder_mac(b"secret", &r, &i)
        ));
        assert_ne!(nonce().unwrap(), nonce().unwrap());
    }
}
