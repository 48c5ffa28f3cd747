//! The daemon's private key: read from the file the config names, or from the systemd
//! credential the unit passes for it (see `relay_core::keys::load_configured_key`), and what
//! the operator is told when it cannot be read: the config key, the file, the user the daemon
//! runs as, and the fix.

use std::io::ErrorKind;
use std::path::Path;

use relay_core::keys::{self, KeyError, KeySource, PrivateKey};

/// The key `config_key` (such as `sentry.private_key`) names at `configured`, and where it was
/// read from.
///
/// # Errors
/// What is wrong, with the fix, in words for the operator.
pub fn load(config_key: &str, configured: &Path) -> Result<(PrivateKey, KeySource), String> {
    keys::load_configured_key(configured).map_err(|e| explain(config_key, configured, &e))
}

fn explain(config_key: &str, configured: &Path, error: &KeyError) -> String {
    let file = configured.display();
    let name = configured
        .file_name()
        .map_or_else(|| "KEY".into(), |n| n.to_string_lossy());
    let user = running_user();
    let mut text = format!("{config_key}: {error}");
    let credential = format!(
        "under systemd the shipped units pass it as a credential, read as root at every start \
         (LoadCredential={name}:{file}), so install it there owned by root with mode 0600 and \
         restart the unit"
    );
    if let KeyError::Io { source, .. } = error {
        match source.kind() {
            ErrorKind::NotFound => {
                text += &format!(
                    "\n  no key there: create one with `sentry keygen --out {file}` (it prints \
                     the public key the other side pins); {credential}"
                );
            }
            ErrorKind::PermissionDenied => {
                text += &format!(
                    "\n  the daemon runs as {user}, which cannot read it: {credential}; run by \
                     hand, run it as the file's owner"
                );
            }
            _ => {}
        }
    }
    text
}

/// The user the daemon runs as, for messages: `name (uid N)` where the name is known (systemd
/// sets `USER` for a unit's user, `DynamicUser=` ones included), else `uid N`.
fn running_user() -> String {
    let uid = rustix::process::geteuid().as_raw();
    let name = match uid {
        0 => Some("root".to_owned()),
        _ => std::env::var("USER").ok().filter(|u| !u.is_empty()),
    };
    match name {
        Some(name) => format!("user {name} (uid {uid})"),
        None => format!("uid {uid}"),
    }
}
