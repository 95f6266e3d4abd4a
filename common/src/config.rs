//! Settings of a role, each declared once.
//!
//! A role's settings are one struct whose every field carries its flag,
//! environment variable, default and help (clap) and its config-file key
//! (serde, the field's name; unknown keys are errors). [`load`] merges, from
//! weakest to strongest: the defaults, the TOML file given with `--config`,
//! then the environment variables and flags that were actually given (clap
//! tells which), with figment. [`defaults`] gives the defaults alone, for a
//! role built in code (the dev mesh, tests).

use std::fmt::Display;
use std::ops::RangeInclusive;
use std::path::Path;

use clap::parser::ValueSource;
use clap::{ArgMatches, Args, FromArgMatches};
use figment::Figment;
use figment::providers::{Format, Serialized, Toml};
use figment::value::{Dict, Value};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Settings that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file cannot be read.
    #[error("cannot read the config file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The settings do not have the shape of the role's settings (an
    /// unknown key, a value of the wrong type).
    #[error("{0}")]
    Shape(String),
    /// A setting has a value out of its range, or a required one is missing.
    #[error("{key} (--{flag}): {problem}")]
    Setting {
        /// The setting's key.
        key: &'static str,
        /// Its flag, without the dashes.
        flag: String,
        /// What is wrong and what is allowed.
        problem: String,
    },
}

impl ConfigError {
    /// A setting `key` whose value is wrong as `problem` says.
    pub fn setting(key: &'static str, problem: impl Into<String>) -> Self {
        ConfigError::Setting {
            key,
            flag: key.replace('_', "-"),
            problem: problem.into(),
        }
    }
}

/// Checks that the number setting `key` is within `range`.
pub fn check_range<N>(
    key: &'static str,
    value: N,
    range: RangeInclusive<N>,
) -> Result<(), ConfigError>
where
    N: PartialOrd + Display,
{
    if range.contains(&value) {
        Ok(())
    } else {
        Err(ConfigError::setting(
            key,
            format!(
                "{value} is out of range: use {} to {}",
                range.start(),
                range.end()
            ),
        ))
    }
}

/// The settings `T` with every default and nothing else: no flag, no
/// environment variable, no file.
pub fn defaults<T: Args + FromArgMatches>() -> T {
    let command =
        T::augment_args(clap::Command::new("defaults")).mut_args(|arg| arg.env(None::<&str>));
    let matches = command.get_matches_from(["defaults"]);
    match T::from_arg_matches(&matches) {
        Ok(settings) => settings,
        // Defaults that do not parse are a bug in a settings struct, which
        // every role's tests catch.
        Err(error) => panic!("the defaults of a settings struct do not parse: {error}"),
    }
}

/// Merges the settings of a role: `parsed` is what clap made of the command
/// line (`matches`) with defaults filled in; `file` is the `--config` file,
/// if any. What the flags and environment gave wins over the file, which
/// wins over the defaults.
pub fn load<T>(matches: &ArgMatches, parsed: &T, file: Option<&Path>) -> Result<T, ConfigError>
where
    T: Serialize + DeserializeOwned,
{
    let all = Value::serialize(parsed)
        .map_err(|error| ConfigError::Shape(error.to_string()))?
        .into_dict()
        .unwrap_or_default();
    let (defaults, given) = split_by_source(all, matches);
    let mut figment = Figment::from(Serialized::defaults(defaults));
    if let Some(path) = file {
        std::fs::metadata(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        figment = figment.merge(Toml::file_exact(path));
    }
    figment
        .merge(Serialized::defaults(given))
        .extract()
        .map_err(|error| ConfigError::Shape(describe(error)))
}

/// Splits `settings` into what clap filled in by default and what a flag
/// or an environment variable gave; nested tables of settings (`[tls]`) are
/// split key by key, while a table that is one setting's value (`--shard`
/// as `[shards]`) goes whole where its flag says.
fn split_by_source(settings: Dict, matches: &ArgMatches) -> (Dict, Dict) {
    let mut defaults = Dict::new();
    let mut given = Dict::new();
    for (key, value) in settings {
        let is_argument = matches.ids().any(|id| id.as_str() == key);
        let value = match value {
            Value::Dict(_, nested) if !is_argument => {
                let (nested_defaults, nested_given) = split_by_source(nested, matches);
                if !nested_defaults.is_empty() {
                    defaults.insert(key.clone(), Value::from(nested_defaults));
                }
                if !nested_given.is_empty() {
                    given.insert(key, Value::from(nested_given));
                }
                continue;
            }
            value => value,
        };
        let from_user = is_argument
            && matches!(
                matches.value_source(&key),
                Some(ValueSource::CommandLine | ValueSource::EnvVariable)
            );
        if from_user {
            given.insert(key, value);
        } else {
            defaults.insert(key, value);
        }
    }
    (defaults, given)
}

/// A figment error as one line per problem, without figment's profile
/// prefix (`default.`).
fn describe(error: figment::Error) -> String {
    error
        .into_iter()
        .map(|error| error.to_string().replace("key \"default.", "key \""))
        .collect::<Vec<_>>()
        .join("; ")
}

/// The settings as TOML, as a config file would give them.
pub fn to_toml<T: Serialize>(settings: &T) -> Result<String, ConfigError> {
    toml::to_string(settings).map_err(|error| ConfigError::Shape(error.to_string()))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use clap::Parser;
    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Clone, PartialEq, Args, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Nested {
        /// A nested number.
        #[arg(long, env = "TEST_CONFIG_DEPTH", default_value_t = 3)]
        depth: u32,
    }

    #[derive(Debug, Clone, PartialEq, Args, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Settings {
        /// A name.
        #[arg(long)]
        name: Option<String>,
        /// A size.
        #[arg(long, default_value_t = 10)]
        size: u64,
        /// A table.
        #[arg(skip)]
        #[serde(default)]
        table: BTreeMap<String, String>,
        #[command(flatten)]
        nested: Nested,
    }

    #[derive(Debug, Parser)]
    struct Command {
        #[command(flatten)]
        settings: Settings,
    }

    fn loaded(args: &[&str], file: Option<&str>) -> Result<Settings, ConfigError> {
        let matches = <Command as clap::CommandFactory>::command()
            .try_get_matches_from(args)
            .expect("parse");
        let parsed = Command::from_arg_matches(&matches).expect("parse").settings;
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("settings.toml");
        if let Some(text) = file {
            std::fs::write(&path, text).expect("write");
        }
        load(&matches, &parsed, file.map(|_| path.as_path()))
    }

    #[test]
    fn flags_win_over_the_file_which_wins_over_defaults() {
        let settings = loaded(
            &["test", "--size", "20"],
            Some("size = 30\nname = \"from-file\"\n[nested]\ndepth = 5\n"),
        )
        .expect("valid");
        assert_eq!(settings.size, 20, "the flag wins");
        assert_eq!(settings.name.as_deref(), Some("from-file"));
        assert_eq!(settings.nested.depth, 5, "nested keys come from the file");
        let settings = loaded(&["test"], None).expect("valid");
        assert_eq!(settings.size, 10);
        assert_eq!(settings.nested.depth, 3);
    }

    #[test]
    fn unknown_keys_and_wrong_types_are_errors_naming_the_key() {
        let error = loaded(&["test"], Some("sise = 3\n")).expect_err("unknown key");
        assert!(error.to_string().contains("sise"), "{error}");
        let error = loaded(&["test"], Some("size = \"big\"\n")).expect_err("wrong type");
        assert!(error.to_string().contains("size"), "{error}");
        let error = loaded(&["test"], Some("[nested]\ndeep = 1\n")).expect_err("nested");
        assert!(error.to_string().contains("deep"), "{error}");
    }

    #[test]
    fn a_missing_file_is_an_error() {
        let matches = <Command as clap::CommandFactory>::command()
            .try_get_matches_from(["test"])
            .expect("parse");
        let parsed = Command::from_arg_matches(&matches).expect("parse").settings;
        let error = load(
            &matches,
            &parsed,
            Some(Path::new("/nonexistent/settings.toml")),
        )
        .expect_err("missing");
        assert!(
            error.to_string().contains("/nonexistent/settings.toml"),
            "{error}"
        );
    }

    #[test]
    fn defaults_ignore_the_environment() {
        // Set for this process only by the test runner's environment, if at
        // all; the defaults never read it.
        let settings: Settings = defaults();
        assert_eq!(settings.size, 10);
        assert_eq!(settings.nested.depth, 3);
        assert_eq!(settings.name, None);
    }

    #[test]
    fn ranges_name_the_setting_and_its_flag() {
        let error = check_range("retention_days", 1_u64 << 60, 1..=36_500).expect_err("overflow");
        let text = error.to_string();
        assert!(
            text.starts_with("retention_days (--retention-days)"),
            "{text}"
        );
        assert!(text.contains("1 to 36500"), "{text}");
    }
}
