//! The allowed shapes of identifiers and headers, checked at the edge of every
//! service before anything is stored.
//!
//! - agency id and region name: 2 to 63 characters of lowercase ASCII letters,
//!   digits and `-`, starting with a letter and not ending with `-`
//!   (`tax-office`, `east`);
//! - message kind: 1 to 128 characters of lowercase ASCII letters, digits,
//!   `.`, `_` and `-`, starting with a letter (`tax.return.filed`);
//! - idempotency key: 1 to 128 printable ASCII characters;
//! - headers: at most 64, keys 1 to 128 printable ASCII characters, values at
//!   most 4096 bytes.

use std::collections::HashMap;

use crate::error::InvalidField;

/// Most headers a message may carry.
pub const MAX_HEADERS: usize = 64;
/// Longest header value in bytes.
pub const MAX_HEADER_VALUE_BYTES: usize = 4096;

/// Checks an agency id (also used for gateway ids).
pub fn agency_id(field: &'static str, value: &str) -> Result<(), InvalidField> {
    name(field, value, "agency id")
}

/// Checks a SPIFFE trust domain: 1 to 255 characters of a-z, 0-9, '.',
/// '-' and '_'.
pub fn trust_domain(value: &str) -> Result<(), InvalidField> {
    let valid = !value.is_empty()
        && value.len() <= 255
        && value.bytes().all(|byte| {
            byte.is_ascii_lowercase() || byte.is_ascii_digit() || matches!(byte, b'.' | b'-' | b'_')
        });
    if valid {
        Ok(())
    } else {
        Err(InvalidField::new(
            "trust_domain",
            "a trust domain is 1 to 255 characters of a-z, 0-9, '.', '-' and '_'",
        ))
    }
}

/// Checks a durable subscription's name.
pub fn subscription_name(field: &'static str, value: &str) -> Result<(), InvalidField> {
    name(field, value, "subscription name")
}

/// Checks a region name.
pub fn region(field: &'static str, value: &str) -> Result<(), InvalidField> {
    name(field, value, "region")?;
    if value == crate::audit::GLOBAL_CHAIN {
        return Err(InvalidField::new(
            field,
            "\"global\" is reserved (the audit log's chain of what concerns no region)",
        ));
    }
    Ok(())
}

fn name(field: &'static str, value: &str, what: &str) -> Result<(), InvalidField> {
    let pattern =
        "2 to 63 characters of a-z, 0-9 and '-', starting with a letter and not ending with '-'";
    if value.is_empty() {
        return Err(InvalidField::new(
            field,
            format!("{what} is required ({pattern})"),
        ));
    }
    let valid_chars = value
        .bytes()
        .all(|byte| byte.is_ascii_lowercase() || byte.is_ascii_digit() || byte == b'-');
    let starts_with_letter = value.as_bytes()[0].is_ascii_lowercase();
    if !(2..=63).contains(&value.len())
        || !valid_chars
        || !starts_with_letter
        || value.ends_with('-')
    {
        return Err(InvalidField::new(
            field,
            format!("{what} {value:?} is malformed: use {pattern}"),
        ));
    }
    Ok(())
}

/// Checks a message kind.
pub fn kind(field: &'static str, value: &str) -> Result<(), InvalidField> {
    let pattern = "1 to 128 characters of a-z, 0-9, '.', '_' and '-', starting with a letter";
    let valid_chars = value.bytes().all(|byte| {
        byte.is_ascii_lowercase() || byte.is_ascii_digit() || matches!(byte, b'.' | b'_' | b'-')
    });
    let starts_with_letter = value
        .bytes()
        .next()
        .is_some_and(|byte| byte.is_ascii_lowercase());
    if value.len() > 128 || !valid_chars || !starts_with_letter {
        return Err(InvalidField::new(
            field,
            format!("kind {value:?} is malformed: use {pattern}"),
        ));
    }
    Ok(())
}

/// Checks an idempotency key.
pub fn idempotency_key(field: &'static str, value: &str) -> Result<(), InvalidField> {
    if value.is_empty() || value.len() > 128 || !value.bytes().all(|byte| byte.is_ascii_graphic()) {
        return Err(InvalidField::new(
            field,
            "idempotency key must be 1 to 128 printable ASCII characters without spaces",
        ));
    }
    Ok(())
}

/// Checks message headers.
pub fn headers(field: &'static str, headers: &HashMap<String, String>) -> Result<(), InvalidField> {
    if headers.len() > MAX_HEADERS {
        return Err(InvalidField::new(
            field,
            format!(
                "{} headers given, at most {MAX_HEADERS} allowed",
                headers.len()
            ),
        ));
    }
    for (key, value) in headers {
        if key.is_empty() || key.len() > 128 || !key.bytes().all(|byte| byte.is_ascii_graphic()) {
            return Err(InvalidField::new(
                field,
                format!(
                    "header name {key:?} must be 1 to 128 printable ASCII characters without spaces"
                ),
            ));
        }
        if value.len() > MAX_HEADER_VALUE_BYTES {
            return Err(InvalidField::new(
                field,
                format!(
                    "header {key:?} is {} bytes, at most {MAX_HEADER_VALUE_BYTES} allowed",
                    value.len()
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agency_ids() {
        for good in ["ab", "tax-office", "m1", "a-b-c"] {
            assert!(agency_id("id", good).is_ok(), "{good}");
        }
        let too_long = "a".repeat(64);
        for bad in [
            "",
            "a",
            "Tax",
            "1abc",
            "abc-",
            "a_b",
            "a b",
            too_long.as_str(),
        ] {
            assert!(agency_id("id", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn kinds() {
        for good in ["a", "tax.return.filed", "x_1-y"] {
            assert!(kind("kind", good).is_ok(), "{good}");
        }
        for bad in ["", "Tax", ".a", "a b", "é"] {
            assert!(kind("kind", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn header_limits() {
        let mut many = HashMap::new();
        for index in 0..=MAX_HEADERS {
            many.insert(format!("h{index}"), String::new());
        }
        assert!(headers("headers", &many).is_err());
        let big = HashMap::from([("k".to_string(), "v".repeat(MAX_HEADER_VALUE_BYTES + 1))]);
        assert!(headers("headers", &big).is_err());
        let fine = HashMap::from([("trace-id".to_string(), "abc".to_string())]);
        assert!(headers("headers", &fine).is_ok());
    }
}
