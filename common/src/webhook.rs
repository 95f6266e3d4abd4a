//! Webhooks as the Standard Webhooks specification has them
//! (<https://www.standardwebhooks.com>): a secret of `whsec_` and base64,
//! and three headers on every POST: `webhook-id` (the event id),
//! `webhook-timestamp` (Unix seconds) and `webhook-signature` (`v1,` and the
//! base64 HMAC-SHA256 of `<id>.<timestamp>.<body>` under the secret's
//! bytes), so that receivers verify with any library of the scheme.

use std::net::IpAddr;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::error::InvalidField;

/// What a secret starts with.
pub const SECRET_PREFIX: &str = "whsec_";
/// Bytes of a secret made by [`new_secret`] (the specification asks for 24
/// to 64).
const SECRET_BYTES: usize = 32;
/// The longest webhook URL accepted.
const MAX_URL_LEN: usize = 2048;

/// The header naming the event.
pub const HEADER_ID: &str = "webhook-id";
/// The header giving when it was signed, Unix seconds.
pub const HEADER_TIMESTAMP: &str = "webhook-timestamp";
/// The header carrying the signature.
pub const HEADER_SIGNATURE: &str = "webhook-signature";

/// A new random signing secret.
pub fn new_secret() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; SECRET_BYTES];
    getrandom::fill(&mut bytes)?;
    Ok(format!("{SECRET_PREFIX}{}", BASE64.encode(bytes)))
}

/// The key of a secret, or None if it is not one.
fn key(secret: &str) -> Option<Vec<u8>> {
    BASE64
        .decode(secret.strip_prefix(SECRET_PREFIX).unwrap_or(secret))
        .ok()
        .filter(|key| !key.is_empty())
}

/// Whether `secret` is a usable secret.
pub fn is_secret(secret: &str) -> bool {
    key(secret).is_some()
}

/// The `webhook-signature` header of `body` sent as event `id` at
/// `timestamp` (Unix seconds); None if `secret` is not a secret.
pub fn signature(secret: &str, id: &str, timestamp: i64, body: &[u8]) -> Option<String> {
    let key = key(secret)?;
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).ok()?;
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    Some(format!("v1,{}", BASE64.encode(mac.finalize().into_bytes())))
}

/// Checks a webhook URL: https://, or http:// to a loopback address (a
/// receiver on the same host), with a host and at most 2048 characters.
pub fn url(field: &'static str, value: &str) -> Result<http::Uri, InvalidField> {
    let invalid = |why: &str| {
        InvalidField::new(
            field,
            format!(
                "{why}: a webhook URL is https://host[:port]/path (http:// only to a loopback address)"
            ),
        )
    };
    if value.len() > MAX_URL_LEN {
        return Err(invalid(&format!("longer than {MAX_URL_LEN} characters")));
    }
    let uri: http::Uri = value
        .parse()
        .map_err(|_| invalid(&format!("{value:?} is not a URL")))?;
    let host = uri
        .host()
        .filter(|host| !host.is_empty())
        .ok_or_else(|| invalid(&format!("{value:?} names no host")))?;
    match uri.scheme_str() {
        Some("https") => Ok(uri),
        Some("http") if is_loopback(host) => Ok(uri),
        Some("http") => Err(invalid(&format!(
            "{value:?} is plain http to {host}, which is not a loopback address"
        ))),
        _ => Err(invalid(&format!(
            "{value:?} is neither https:// nor http://"
        ))),
    }
}

fn is_loopback(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || bare
            .parse::<IpAddr>()
            .is_ok_and(|address| address.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_matches_the_specifications_example() {
        // The example of the Standard Webhooks specification's test vectors.
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let body = br#"{"test": 2432232314}"#;
        assert_eq!(
            signature(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body).as_deref(),
            Some("v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=")
        );
    }

    #[test]
    fn secrets_are_new_each_time_and_usable() {
        let first = new_secret().expect("secret");
        let second = new_secret().expect("secret");
        assert_ne!(first, second);
        assert!(first.starts_with(SECRET_PREFIX) && is_secret(&first));
        assert!(!is_secret("whsec_"));
        assert!(!is_secret("whsec_not base64!"));
    }

    #[test]
    fn urls_are_https_or_plain_http_to_loopback() {
        for good in [
            "https://receiver.example/events",
            "https://10.0.0.7:8443/hook",
            "http://127.0.0.1:9000/hook",
            "http://localhost/hook",
            "http://[::1]:9000/hook",
        ] {
            assert!(url("webhook.url", good).is_ok(), "{good}");
        }
        for bad in [
            "http://receiver.example/events",
            "ftp://receiver.example/",
            "receiver.example/events",
            "https:///events",
            "",
        ] {
            let invalid = url("webhook.url", bad).expect_err(bad);
            assert_eq!(invalid.field, "webhook.url");
            assert!(invalid.description.contains("https://"), "{invalid:?}");
        }
    }
}
