//! Where a daemon reads its private key: the file the config names, or, under systemd, the
//! credential the unit passes for it (`LoadCredential=agent.key:/etc/sentry/agent.key`).
//!
//! systemd reads the credential's source as root at every start and places a copy in
//! `$CREDENTIALS_DIRECTORY`, a directory only this unit's processes can read, owned (or made
//! readable by an ACL) for the unit's user. So a key installed or rotated at any time, root's
//! and mode 0600, is read after the next start, whatever user `DynamicUser=` picked; nothing
//! has to be chowned to a user that exists only while the unit runs.
//!
//! The credential used is the one named like the configured file (`agent.key` for
//! `/etc/sentry/agent.key`). It is read without the owner and mode checks of a plain key file:
//! the directory is private to the unit, and with an ACL a credential's mode shows a group
//! bit that grants nobody else anything.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use zeroize::Zeroize;

use super::{KeyError, PrivateKey, load_private_key};

/// The environment variable systemd sets when a unit has credentials.
const CREDENTIALS_DIRECTORY: &str = "CREDENTIALS_DIRECTORY";

/// Where a key was read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// The file the config names.
    File(PathBuf),
    /// The systemd credential of that name, in the unit's credentials directory.
    Credential { name: String, path: PathBuf },
}

impl std::fmt::Display for KeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::File(path) => write!(f, "{}", path.display()),
            Self::Credential { name, path } => {
                write!(f, "systemd credential {name} ({})", path.display())
            }
        }
    }
}

/// Where the key configured at `configured` is read from: the credential of the same file
/// name when the unit passes one, else the file itself. The shipped units pair
/// `LoadCredential=` with a `SetCredential=` placeholder ([`UNSET_CREDENTIAL`]), so a unit
/// whose key file is not installed yet still starts its daemon, which then says which key is
/// missing and the fix, rather than failing in systemd with `243/CREDENTIALS` and nothing
/// about the key.
#[must_use]
pub fn key_source(configured: &Path) -> KeySource {
    let credential = std::env::var_os(CREDENTIALS_DIRECTORY).and_then(|dir| {
        let name = configured.file_name()?.to_str()?.to_owned();
        let path = Path::new(&dir).join(&name);
        // The unit's `SetCredential=NAME:unset` default means systemd had no file to load:
        // the file itself is then read, so a missing one is reported as such.
        let loaded = fs::metadata(&path).is_ok_and(|m| m.is_file()) && !is_unset(&path);
        loaded.then_some(KeySource::Credential { name, path })
    });
    credential.unwrap_or_else(|| KeySource::File(configured.to_owned()))
}

/// What the shipped units pass as a key's credential while its file is not installed
/// (`SetCredential=sentry.key:unset`, the default systemd uses when `LoadCredential=` finds no
/// file; systemd 252 refuses an empty value).
pub const UNSET_CREDENTIAL: &str = "unset";

/// Whether the credential at `path` is the units' placeholder (or empty) rather than a key. A
/// key is 44 bytes or more: at most its first 16 are read here, and wiped at once.
fn is_unset(path: &Path) -> bool {
    let Ok(file) = fs::File::open(path) else {
        return false;
    };
    let mut head = String::new();
    if (&file).take(16).read_to_string(&mut head).is_err() || head.len() >= 16 {
        head.zeroize();
        return false;
    }
    let unset = matches!(head.trim(), "" | UNSET_CREDENTIAL);
    head.zeroize();
    unset
}

/// Whether the daemon runs with systemd credentials at all (a unit with `LoadCredential=`).
#[must_use]
pub fn has_credentials() -> bool {
    std::env::var_os(CREDENTIALS_DIRECTORY).is_some()
}

/// Read the key configured at `configured` (see [`key_source`]).
///
/// # Errors
/// The file or credential cannot be read, a plain file is readable by others or owned by
/// another user, or it holds no key.
pub fn load_configured_key(configured: &Path) -> Result<(PrivateKey, KeySource), KeyError> {
    let source = key_source(configured);
    let key = match &source {
        KeySource::File(path) => load_private_key(path)?,
        KeySource::Credential { path, .. } => load_credential(path)?,
    };
    Ok((key, source))
}

fn load_credential(path: &Path) -> Result<PrivateKey, KeyError> {
    let io = |source| KeyError::Io {
        path: path.to_owned(),
        source,
    };
    let file = fs::File::open(path).map_err(io)?;
    let mut text = String::new();
    let read = (&file).take(1024).read_to_string(&mut text);
    let key = read.ok().and_then(|_| PrivateKey::from_base64(&text));
    text.zeroize();
    key.ok_or_else(|| KeyError::Malformed {
        path: path.to_owned(),
    })
}
