//! Host keys: one Ed25519 key per host, pinned by its peers.
//!
//! A private key file holds one line: the base64 of the 32-byte Ed25519 seed. The public key
//! that peers pin is the base64 of the 32-byte Ed25519 public key. QUIC (and later TLS) carry
//! the key in a self-signed certificate that is generated at start-up and never trusted for
//! anything but the key inside it: the verifiers in `transport::pin` compare the certificate's
//! SubjectPublicKeyInfo with the pinned key and check the handshake signature, nothing else.
//!
//! Invariants: private key material is never printed by `Debug` or logged, and is wiped from
//! memory when dropped; a private key file readable by group or others, or owned by another
//! user than the daemon's (or root), is refused: checked on the opened file, so it cannot be
//! swapped between the check and the read.

use std::fmt;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{Ed25519KeyPair, KeyPair};
use zeroize::Zeroize;

mod credential;
pub use credential::{KeySource, has_credentials, key_source, load_configured_key};

/// Length of an Ed25519 seed and of an Ed25519 public key.
pub(crate) const KEY_LEN: usize = 32;

/// DER prefix of a PKCS#8 v1 Ed25519 private key (RFC 8410 §7); the seed follows.
const PKCS8_ED25519_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];
/// DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410 §4); the public key follows.
const SPKI_ED25519_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// A host's private key (an Ed25519 seed).
#[derive(Clone)]
pub struct PrivateKey {
    seed: [u8; KEY_LEN],
}

impl Drop for PrivateKey {
    fn drop(&mut self) {
        self.seed.zeroize();
    }
}

/// A peer's public key, as pinned in config files.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublicKey([u8; KEY_LEN]);

/// Why a key could not be read, parsed or written.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path}: private key file is readable by group or others (mode {mode:04o}); \
         run `chmod 600 {path}` and make it owned by the daemon's user"
    )]
    Permissions { path: PathBuf, mode: u32 },
    #[error(
        "{path}: private key file is owned by uid {owner}, neither the daemon's user (uid \
         {daemon}) nor root; run `chown {daemon} {path}` (another user could replace the key)"
    )]
    Owner {
        path: PathBuf,
        owner: u32,
        daemon: u32,
    },
    #[error("{path}: not a sentry private key (expected one line of base64 encoding 32 bytes)")]
    Malformed { path: PathBuf },
    #[error("{path}: already exists; refusing to overwrite a key (remove it first)")]
    Exists { path: PathBuf },
    #[error("the system random generator failed")]
    Random,
}

impl PrivateKey {
    /// A fresh key from the operating system's random generator.
    pub fn generate() -> Result<Self, KeyError> {
        let mut seed = [0u8; KEY_LEN];
        SystemRandom::new()
            .fill(&mut seed)
            .map_err(|_| KeyError::Random)?;
        Ok(Self { seed })
    }

    /// Parse the base64 line of a key file.
    #[must_use]
    pub(crate) fn from_base64(text: &str) -> Option<Self> {
        decode_32(text).map(|seed| Self { seed })
    }

    /// The base64 line stored in a key file.
    #[must_use]
    pub(crate) fn to_base64(&self) -> String {
        B64.encode(self.seed)
    }

    /// The public key peers pin.
    #[must_use]
    pub fn public_key(&self) -> PublicKey {
        let pair = Ed25519KeyPair::from_seed_unchecked(&self.seed)
            .expect("invariant: every 32-byte seed is a valid Ed25519 seed");
        let mut public = [0u8; KEY_LEN];
        public.copy_from_slice(pair.public_key().as_ref());
        PublicKey(public)
    }

    /// The key as PKCS#8 v1 DER, the form rustls and rcgen take.
    #[must_use]
    pub(crate) fn pkcs8_der(&self) -> Vec<u8> {
        let mut der = PKCS8_ED25519_PREFIX.to_vec();
        der.extend_from_slice(&self.seed);
        der
    }

    /// Derive a 32-byte secret for `purpose` (HMAC-SHA256 keyed by the seed). Used for QUIC
    /// stateless-reset keys, so that a restarted daemon can tell its peers at once that their
    /// old connection is gone.
    #[must_use]
    pub fn derive(&self, purpose: &str) -> [u8; 32] {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &self.seed);
        let tag = ring::hmac::sign(&key, purpose.as_bytes());
        let mut out = [0u8; 32];
        out.copy_from_slice(tag.as_ref());
        out
    }
}

impl PrivateKey {
    /// The host's WireGuard (X25519) private key, derived as libsodium's
    /// `crypto_sign_ed25519_sk_to_curve25519` does: the first half of SHA-512 of the seed,
    /// clamped. Its public key is [`PublicKey::wireguard`] of [`Self::public_key`], so one
    /// pinned Ed25519 key serves QUIC, TLS and WireGuard.
    #[must_use]
    pub fn wireguard_secret(&self) -> [u8; KEY_LEN] {
        let digest = ring::digest::digest(&ring::digest::SHA512, &self.seed);
        let mut secret = [0u8; KEY_LEN];
        secret.copy_from_slice(&digest.as_ref()[..KEY_LEN]);
        secret[0] &= 248;
        secret[31] &= 127;
        secret[31] |= 64;
        secret
    }
}

impl PrivateKey {
    /// The host's WireGuard public key in `wg pubkey` form (base64), for a plain peer's
    /// `wg` config.
    #[must_use]
    pub fn wireguard_public_base64(&self) -> String {
        let secret = boringtun::x25519::StaticSecret::from(self.wireguard_secret());
        B64.encode(boringtun::x25519::PublicKey::from(&secret).to_bytes())
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PrivateKey(public {})", self.public_key())
    }
}

impl PublicKey {
    /// The WireGuard (X25519) public key of the same host: the Montgomery form of this
    /// Edwards point (libsodium's `crypto_sign_ed25519_pk_to_curve25519`). `None` when the
    /// 32 bytes are not a point on the curve (no host key is such).
    #[must_use]
    pub fn wireguard(&self) -> Option<[u8; KEY_LEN]> {
        let point = curve25519_dalek::edwards::CompressedEdwardsY(self.0).decompress()?;
        Some(point.to_montgomery().to_bytes())
    }

    /// Parse the base64 form printed by `sentry keygen` / `sentry pubkey`.
    #[must_use]
    pub(crate) fn from_base64(text: &str) -> Option<Self> {
        decode_32(text).map(Self)
    }

    /// The raw 32 bytes.
    #[must_use]
    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    #[cfg(test)]
    /// The DER SubjectPublicKeyInfo of this key.
    #[must_use]
    pub(crate) fn spki_der(&self) -> Vec<u8> {
        let mut der = SPKI_ED25519_PREFIX.to_vec();
        der.extend_from_slice(&self.0);
        der
    }

    /// The key inside an Ed25519 SubjectPublicKeyInfo; `None` for any other key type.
    #[must_use]
    pub(crate) fn from_spki_der(der: &[u8]) -> Option<Self> {
        let key = der.strip_prefix(&SPKI_ED25519_PREFIX[..])?;
        key.try_into().ok().map(Self)
    }
}

/// A WireGuard public key as `wg pubkey` prints it.
#[must_use]
pub fn wireguard_key_base64(key: &[u8; 32]) -> String {
    B64.encode(key)
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&B64.encode(self.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

fn decode_32(text: &str) -> Option<[u8; KEY_LEN]> {
    let bytes = B64.decode(text.trim()).ok()?;
    bytes.try_into().ok()
}

/// Read a private key file, refusing one that group or others can read.
pub fn load_private_key(path: &Path) -> Result<PrivateKey, KeyError> {
    let io = |source| KeyError::Io {
        path: path.to_owned(),
        source,
    };
    let file = fs::File::open(path).map_err(io)?;
    // The checks are on the file opened, not on the path: it cannot be swapped in between.
    check_owner_and_mode(&file.metadata().map_err(io)?, 0o077).map_err(|e| match e {
        OwnerOrMode::Mode(mode) => KeyError::Permissions {
            path: path.to_owned(),
            mode,
        },
        OwnerOrMode::Owner { owner, daemon } => KeyError::Owner {
            path: path.to_owned(),
            owner,
            daemon,
        },
    })?;
    let mut text = String::new();
    let read = (&file).take(1024).read_to_string(&mut text);
    let key = read.ok().and_then(|_| PrivateKey::from_base64(&text));
    text.zeroize();
    key.ok_or_else(|| KeyError::Malformed {
        path: path.to_owned(),
    })
}

/// Why a secret file's metadata is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OwnerOrMode {
    /// Permission bits in `forbidden` are set (the file's mode).
    Mode(u32),
    /// Owned by `owner`, neither the daemon's user `daemon` nor root.
    Owner { owner: u32, daemon: u32 },
}

/// Whether a secret file (opened, its metadata read from the open file) may be trusted: no
/// permission bit of `forbidden` set, and owned by the daemon's effective user or root.
///
/// # Errors
/// What is wrong with it.
pub(crate) fn check_owner_and_mode(meta: &fs::Metadata, forbidden: u32) -> Result<(), OwnerOrMode> {
    use std::os::unix::fs::MetadataExt;
    let mode = meta.permissions().mode() & 0o777;
    if mode & forbidden != 0 {
        return Err(OwnerOrMode::Mode(mode));
    }
    let daemon = rustix::process::geteuid().as_raw();
    if meta.uid() != daemon && meta.uid() != 0 {
        return Err(OwnerOrMode::Owner {
            owner: meta.uid(),
            daemon,
        });
    }
    Ok(())
}

/// Write a new private key file with mode 0600. Never overwrites an existing file.
pub fn write_private_key(path: &Path, key: &PrivateKey) -> Result<(), KeyError> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|source| match source.kind() {
            std::io::ErrorKind::AlreadyExists => KeyError::Exists {
                path: path.to_owned(),
            },
            _ => KeyError::Io {
                path: path.to_owned(),
                source,
            },
        })?;
    // The umask cannot widen 0600, but an inherited ACL default could; set it explicitly.
    file.set_permissions(fs::Permissions::from_mode(0o600))
        .and_then(|()| writeln!(file, "{}", key.to_base64()))
        .and_then(|()| file.sync_all())
        .map_err(|source| KeyError::Io {
            path: path.to_owned(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex32(text: &str) -> [u8; KEY_LEN] {
        let mut out = [0u8; KEY_LEN];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).unwrap();
        }
        out
    }

    #[test]
    fn wireguard_keys_match_libsodium_conversion_vectors() {
        // libsodium test/default/ed25519_convert.c and its .exp file.
        let key = PrivateKey {
            seed: hex32("421151a459faeade3d247115f94aedae42318124095afabe4d1451a559faedee"),
        };
        assert_eq!(
            key.wireguard_secret(),
            hex32("8052030376d47112be7f73ed7a019293dd12ad910b654455798b4667d73de166")
        );
        assert_eq!(
            key.public_key().wireguard(),
            Some(hex32(
                "f1814f0e8ff1043d8a44d25babff3cedcae6c22c3edaa48f857ae70de2baae50"
            ))
        );
    }

    #[test]
    fn wireguard_public_key_is_the_secrets_public_key() {
        for _ in 0..32 {
            let key = PrivateKey::generate().unwrap();
            let secret = boringtun::x25519::StaticSecret::from(key.wireguard_secret());
            let public = boringtun::x25519::PublicKey::from(&secret);
            assert_eq!(key.public_key().wireguard(), Some(public.to_bytes()));
        }
        // Not every 32 bytes are a point: y = 2 has no x on the curve.
        let mut not_a_point = [0u8; KEY_LEN];
        not_a_point[0] = 2;
        assert_eq!(PublicKey(not_a_point).wireguard(), None);
    }

    #[test]
    fn rfc8032_test_vector_1() {
        // RFC 8032 §7.1, TEST 1.
        let seed = "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60";
        let public = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a";
        let seed: Vec<u8> = (0..32)
            .map(|i| u8::from_str_radix(&seed[2 * i..2 * i + 2], 16).unwrap())
            .collect();
        let key = PrivateKey::from_base64(&B64.encode(&seed)).unwrap();
        let hex: String = key
            .public_key()
            .as_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(hex, public);
    }

    #[test]
    fn base64_round_trip_and_rejects() {
        let key = PrivateKey::generate().unwrap();
        let again = PrivateKey::from_base64(&format!("  {}\n", key.to_base64())).unwrap();
        assert_eq!(key.public_key(), again.public_key());
        let public = key.public_key();
        assert_eq!(PublicKey::from_base64(&public.to_string()), Some(public));
        assert!(PublicKey::from_base64("AAAA").is_none());
        assert!(PublicKey::from_base64("not base64 at all!").is_none());
        assert!(PublicKey::from_base64(&B64.encode([0u8; 33])).is_none());
    }

    #[test]
    fn spki_round_trip() {
        let public = PrivateKey::generate().unwrap().public_key();
        assert_eq!(PublicKey::from_spki_der(&public.spki_der()), Some(public));
        let mut other = public.spki_der();
        other[8] ^= 1; // a different algorithm OID
        assert!(PublicKey::from_spki_der(&other).is_none());
    }

    #[test]
    fn debug_never_shows_the_seed() {
        let key = PrivateKey::generate().unwrap();
        assert!(!format!("{key:?}").contains(&key.to_base64()));
    }

    #[test]
    fn file_is_0600_and_loose_modes_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        let key = PrivateKey::generate().unwrap();
        write_private_key(&path, &key).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(
            load_private_key(&path).unwrap().public_key(),
            key.public_key()
        );
        assert!(matches!(
            write_private_key(&path, &key),
            Err(KeyError::Exists { .. })
        ));
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        let err = load_private_key(&path).unwrap_err();
        assert!(
            matches!(err, KeyError::Permissions { mode: 0o640, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("chmod 600"));
    }

    /// A key file another (non-root) user owns could be replaced by that user: refused,
    /// naming the owner and the fix. (Needs root, to give the file away; skipped otherwise.)
    #[test]
    fn a_key_file_owned_by_another_user_is_refused() {
        if !rustix::process::geteuid().is_root() {
            eprintln!("skipped: needs root to chown the file");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        write_private_key(&path, &PrivateKey::generate().unwrap()).unwrap();
        std::os::unix::fs::chown(&path, Some(54_321), None).unwrap();
        let err = load_private_key(&path).unwrap_err();
        assert!(
            matches!(
                err,
                KeyError::Owner {
                    owner: 54_321,
                    daemon: 0,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("chown 0"), "{err}");
    }
}
