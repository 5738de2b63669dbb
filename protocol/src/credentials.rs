//! Who a client says it is: usernames and passwords parsed from the network (a
//! value of these types is valid), and the identity a connection proves.

use crate::ids::{DeviceId, UserId};
use confab_proto::v1::PushPlatform;
use std::fmt;

const USERNAME_MIN_CHARS: usize = 3;
const USERNAME_MAX_CHARS: usize = 32;
const PASSWORD_MIN_CHARS: usize = 8;
const PASSWORD_MAX_BYTES: usize = 1024;
const DEVICE_NAME_MAX_CHARS: usize = 64;
const DISPLAY_NAME_MAX_CHARS: usize = 64;

const NAMESPACE_MAX_CHARS: usize = 16;
const SUBJECT_MAX_BYTES: usize = 128;

/// A username. A password account's name is normalised: 3–32 of `a-z 0-9 _ . -`,
/// starting with a letter; input is case-folded (ASCII), so `Alice` and `alice`
/// are one account. A user of the app's own sign-in (JWT) is named
/// `<namespace>:<subject>`, kept as given: a namespace of 1–16 `a-z 0-9 _ -` and
/// the token's subject, 1–128 printable ASCII characters. No password account
/// can take such a name (it has a `:`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Username(String);

/// Why a token's subject cannot name a user.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the token's subject must be 1-{SUBJECT_MAX_BYTES} printable ASCII characters")]
pub struct InvalidSubject;

/// Why a username was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "username must be {USERNAME_MIN_CHARS}-{USERNAME_MAX_CHARS} characters of a-z, 0-9, '_', '.', '-', starting with a letter"
)]
pub struct InvalidUsername;

impl Username {
    /// Validates and normalises a username from the network.
    pub fn parse(raw: &str) -> Result<Self, InvalidUsername> {
        let name = raw.to_ascii_lowercase();
        let allowed = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '.' | '-');
        let valid = (USERNAME_MIN_CHARS..=USERNAME_MAX_CHARS).contains(&name.len())
            && name.starts_with(|c: char| c.is_ascii_lowercase())
            && name.chars().all(allowed);
        if valid { Ok(Self(name)) } else { Err(InvalidUsername) }
    }

    /// A name to look a user up by: a password account's (normalised) or, with a
    /// `:`, a user of the app's sign-in (as given).
    pub fn lookup(raw: &str) -> Result<Self, InvalidUsername> {
        match raw.split_once(':') {
            Some((namespace, subject)) => Self::external(namespace, subject).map_err(|_| InvalidUsername),
            None => Self::parse(raw),
        }
    }

    /// Whether this names a user of the app's sign-in (`namespace:subject`).
    pub fn is_external(&self) -> bool {
        self.0.contains(':')
    }

    /// The name of the user the app's sign-in calls `subject`, in `namespace`.
    pub fn external(namespace: &str, subject: &str) -> Result<Self, InvalidSubject> {
        let namespace_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '-');
        let valid = (1..=NAMESPACE_MAX_CHARS).contains(&namespace.len())
            && namespace.chars().all(namespace_char)
            && (1..=SUBJECT_MAX_BYTES).contains(&subject.len())
            && subject.bytes().all(|b| b.is_ascii_graphic());
        if valid {
            Ok(Self(format!("{namespace}:{subject}")))
        } else {
            Err(InvalidSubject)
        }
    }

    /// The normalised name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Username {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A password of acceptable length. Its `Debug` never shows it.
#[derive(Clone)]
pub struct Password(String);

/// Why a password was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("password must be at least {PASSWORD_MIN_CHARS} characters and at most {PASSWORD_MAX_BYTES} bytes")]
pub struct InvalidPassword;

impl Password {
    /// Accepts a password of acceptable length.
    pub fn parse(raw: String) -> Result<Self, InvalidPassword> {
        if raw.chars().count() >= PASSWORD_MIN_CHARS && raw.len() <= PASSWORD_MAX_BYTES {
            Ok(Self(raw))
        } else {
            Err(InvalidPassword)
        }
    }

    /// The password itself, for hashing or verifying it.
    pub fn expose(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(<redacted>)")
    }
}

/// An authenticated (user, device) pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The user.
    pub user: UserId,
    /// Which of its devices.
    pub device: DeviceId,
    /// The user's name.
    pub username: String,
    /// The name shown for the user; may be empty.
    pub display_name: String,
    /// When the access token that proved it expires (Unix ms).
    pub expires_at_ms: u64,
}

/// A device's display name: trimmed, at most 64 characters, "unnamed" when empty.
pub fn device_name(raw: &str) -> String {
    let name: String = raw
        .trim()
        .chars()
        .filter(|c| !c.is_control())
        .take(DEVICE_NAME_MAX_CHARS)
        .collect();
    if name.is_empty() { "unnamed".to_owned() } else { name }
}

/// Longest push token taken.
const PUSH_TOKEN_MAX_BYTES: usize = 4096;

/// Where a device is reached while it has no connection: a token of the app's
/// push service (FCM, APNs, Web Push, or the app's own webhook).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushToken {
    /// Whose token it is.
    pub platform: PushPlatform,
    /// The token, as the platform gave it to the device.
    pub token: String,
}

/// Why a push token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidPushToken {
    /// No platform named.
    #[error("platform is required with a token")]
    Platform,
    /// Too long.
    #[error("token is longer than {PUSH_TOKEN_MAX_BYTES} bytes")]
    TooLong,
}

impl PushToken {
    /// A token from the network: `None` for an empty one (removing it).
    pub fn parse(platform: i32, token: String) -> Result<Option<Self>, InvalidPushToken> {
        if token.is_empty() {
            return Ok(None);
        }
        if token.len() > PUSH_TOKEN_MAX_BYTES {
            return Err(InvalidPushToken::TooLong);
        }
        match PushPlatform::try_from(platform) {
            Ok(PushPlatform::Unspecified) | Err(_) => Err(InvalidPushToken::Platform),
            Ok(platform) => Ok(Some(Self { platform, token })),
        }
    }
}

/// A display name from a token's claim or the server API: trimmed, without
/// control characters, at most 64 characters (cut there); may be empty.
pub fn display_name(raw: &str) -> String {
    raw.trim()
        .chars()
        .filter(|c| !c.is_control())
        .take(DISPLAY_NAME_MAX_CHARS)
        .collect::<String>()
        .trim_end()
        .to_owned()
}

/// The device a client names when its token names none: trimmed, without control
/// characters; `None` when empty, an error past 64 characters.
pub fn device_label(raw: &str) -> Result<Option<String>, TooLongDeviceName> {
    let label: String = raw.trim().chars().filter(|c| !c.is_control()).collect();
    match label.chars().count() {
        0 => Ok(None),
        n if n > DEVICE_NAME_MAX_CHARS => Err(TooLongDeviceName),
        _ => Ok(Some(label)),
    }
}

/// Why a device label was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("device must be at most {DEVICE_NAME_MAX_CHARS} characters")]
pub struct TooLongDeviceName;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_of_the_apps_users_keep_their_case_and_cannot_be_signed_up() {
        let name = Username::external("app", "auth0|Ab12").unwrap();
        assert_eq!(name.as_str(), "app:auth0|Ab12");
        assert_eq!(Username::lookup("app:auth0|Ab12").unwrap(), name);
        assert_eq!(Username::lookup("Alice").unwrap().as_str(), "alice");
        assert!(Username::parse("app:auth0|Ab12").is_err());
        for (namespace, subject) in [
            ("", "x"),
            ("App", "x"),
            ("app", ""),
            ("app", "has space"),
            ("app", "é"),
            ("app", &"x".repeat(129)),
            ("a-very-long-namespace", "x"),
        ] {
            assert!(Username::external(namespace, subject).is_err(), "{namespace}:{subject}");
        }
        assert!(Username::external("app", &"x".repeat(128)).is_ok());
    }

    #[test]
    fn push_tokens_need_a_platform_and_a_bounded_length() {
        let fcm = PushPlatform::Fcm as i32;
        assert_eq!(PushToken::parse(fcm, String::new()), Ok(None));
        assert_eq!(
            PushToken::parse(fcm, "t".into()),
            Ok(Some(PushToken {
                platform: PushPlatform::Fcm,
                token: "t".into()
            }))
        );
        assert_eq!(PushToken::parse(0, "t".into()), Err(InvalidPushToken::Platform));
        assert_eq!(PushToken::parse(99, "t".into()), Err(InvalidPushToken::Platform));
        assert_eq!(PushToken::parse(fcm, "t".repeat(4097)), Err(InvalidPushToken::TooLong));
    }

    #[test]
    fn display_names_are_trimmed_and_cut() {
        assert_eq!(display_name("  Ada\u{7}  Lovelace \n"), "Ada  Lovelace");
        assert_eq!(display_name(&"é".repeat(70)).chars().count(), 64);
        assert_eq!(display_name(" "), "");
    }

    #[test]
    fn device_labels_are_trimmed_and_bounded() {
        assert_eq!(device_label("  "), Ok(None));
        assert_eq!(device_label(" phone\n"), Ok(Some("phone".into())));
        assert_eq!(
            device_label(&"é".repeat(64)).map(|label| label.map(|l| l.len())),
            Ok(Some(128))
        );
        assert_eq!(device_label(&"x".repeat(65)), Err(TooLongDeviceName));
    }

    #[test]
    fn usernames_are_normalised_and_validated() {
        assert_eq!(Username::parse("Alice_1").unwrap().as_str(), "alice_1");
        for bad in [
            "",
            "ab",
            "1abc",
            "_abc",
            "al ice",
            "ålice",
            "a".repeat(33).as_str(),
            "bob!",
        ] {
            assert!(Username::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert!(Username::parse(&"a".repeat(32)).is_ok());
    }

    #[test]
    fn passwords_are_bounded_and_redacted() {
        assert!(Password::parse("short".into()).is_err());
        assert!(Password::parse("x".repeat(PASSWORD_MAX_BYTES + 1)).is_err());
        let password = Password::parse("correct horse".into()).unwrap();
        assert!(!format!("{password:?}").contains("horse"));
    }

    #[test]
    fn device_names_are_cleaned() {
        assert_eq!(device_name("  "), "unnamed");
        assert_eq!(device_name("phone\n"), "phone");
        assert_eq!(device_name(&"x".repeat(100)).len(), DEVICE_NAME_MAX_CHARS);
    }
}
