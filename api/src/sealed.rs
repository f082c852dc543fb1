//! Secrets kept at rest (sellers' bank account numbers): AES-256-GCM with a
//! fresh random nonce each time, bound to the row they belong to (the
//! associated data), so a ciphertext copied onto another shop's row does
//! not open.

use aes_gcm::{
    Aes256Gcm, Nonce,
    aead::{Aead, AeadCore, KeyInit, OsRng, Payload},
};

pub struct Sealed {
    pub ciphertext: Vec<u8>,
    pub nonce: Vec<u8>,
}

fn cipher(key: &[u8; 32]) -> Aes256Gcm {
    Aes256Gcm::new(&(*key).into())
}

pub fn seal(key: &[u8; 32], plaintext: &str, bound_to: &[u8]) -> Sealed {
    let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
    let payload = Payload {
        msg: plaintext.as_bytes(),
        aad: bound_to,
    };
    let ciphertext = cipher(key)
        .encrypt(&nonce, payload)
        .expect("AES-GCM encrypts any message of this size");
    Sealed {
        ciphertext,
        nonce: nonce.to_vec(),
    }
}

/// The plaintext, or `None` if the key, the row or the bytes do not match.
pub fn open(key: &[u8; 32], sealed: &Sealed, bound_to: &[u8]) -> Option<String> {
    let nonce: Nonce<_> = <[u8; 12]>::try_from(sealed.nonce.as_slice()).ok()?.into();
    let payload = Payload {
        msg: &sealed.ciphertext,
        aad: bound_to,
    };
    let bytes = cipher(key).decrypt(&nonce, payload).ok()?;
    String::from_utf8(bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_only_with_its_key_and_its_row() {
        let key = [9; 32];
        let sealed = seal(&key, "DE89370400440532013000", b"shop-1");
        assert_eq!(
            open(&key, &sealed, b"shop-1").as_deref(),
            Some("DE89370400440532013000")
        );
        assert_eq!(open(&key, &sealed, b"shop-2"), None, "moved to another row");
        assert_eq!(open(&[8; 32], &sealed, b"shop-1"), None, "another key");
        assert!(
            !sealed.ciphertext.windows(4).any(|w| w == b"3000"),
            "not in the clear"
        );
        let again = seal(&key, "DE89370400440532013000", b"shop-1");
        assert_ne!(again.nonce, sealed.nonce, "a fresh nonce each time");
    }
}
