//! Layered configuration: serde defaults ← TOML file ← environment variables.
//!
//! Environment variables are named `LIFTWIRE_{BINARY}__{SECTION}__{KEY}`: a double underscore
//! separates levels, so `LIFTWIRE_GATEWAY__NATS__URL=nats://10.0.0.5:4222` sets `nats.url` of the
//! gateway. Every config struct denies unknown fields, so a typo is an error that names the key
//! and where it came from (file or variable), not a silently ignored setting.
//!
//! Values are parsed: `4222` is a number and `true` a boolean; quote a numeric-looking string
//! (`LIFTWIRE_FIRMWARE_SIM__SEED='"0042"'`) to keep it a string.
//!
//! The environment is read through [`Environment`], so tests pass a map instead of mutating the
//! process environment.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use figment::providers::{Format, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};
use serde::de::DeserializeOwned;

/// A source of environment variables.
pub trait Environment: Send + Sync {
    /// Every variable as a `(name, value)` pair; non-UTF-8 variables are skipped.
    fn vars(&self) -> Vec<(String, String)>;
}

/// The real process environment.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessEnv;

impl Environment for ProcessEnv {
    fn vars(&self) -> Vec<(String, String)> {
        std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
            .collect()
    }
}

impl Environment for BTreeMap<String, String> {
    fn vars(&self) -> Vec<(String, String)> {
        self.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }
}

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The configuration file given on the command line does not exist.
    #[error("config file {0} does not exist")]
    MissingFile(PathBuf),
    /// A value is missing, mistyped, unknown or malformed.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// Prefix of the environment variables of binary `binary` (e.g. `LIFTWIRE_GATEWAY__`).
pub fn env_prefix(binary: &str) -> String {
    format!(
        "LIFTWIRE_{}__",
        binary.to_ascii_uppercase().replace('-', "_")
    )
}

/// Loads `T` for `binary` from its serde defaults, then `file` (TOML), then the variables of
/// `env` that start with [`env_prefix`]`(binary)`.
pub fn load<T: DeserializeOwned>(
    binary: &str,
    file: Option<&Path>,
    env: &dyn Environment,
) -> Result<T, ConfigError> {
    let mut figment = Figment::new();
    if let Some(path) = file {
        if !path.exists() {
            return Err(ConfigError::MissingFile(path.to_owned()));
        }
        figment = figment.merge(Toml::file_exact(path));
    }
    let prefix = env_prefix(binary);
    let mut vars = env.vars();
    vars.sort();
    for (name, value) in vars {
        if let Some(rest) = name.strip_prefix(&prefix) {
            let key = rest.to_ascii_lowercase().replace("__", ".");
            figment = figment.merge(EnvVar { name, key, value });
        }
    }
    figment.extract().map_err(|e| {
        ConfigError::Invalid(
            e.into_iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("; "),
        )
    })
}

/// One environment variable as a figment provider, so errors name the variable.
struct EnvVar {
    name: String,
    key: String,
    value: String,
}

impl Provider for EnvVar {
    fn metadata(&self) -> Metadata {
        Metadata::named(format!("environment variable {}", self.name))
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        // Parsed like figment's own `Env`: `42` is a number, `true` a boolean, `"42"` a string.
        let value: Value = self.value.parse().unwrap_or_else(|never| match never {});
        Ok(Map::from([(
            Profile::Default,
            figment::util::nest(&self.key, value)
                .into_dict()
                .unwrap_or_default(),
        )]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use std::io::Write;
    use std::time::Duration;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct Sample {
        name: String,
        port: u16,
        #[serde(with = "humantime_serde")]
        grace: Duration,
        nested: Nested,
    }

    #[derive(Debug, Deserialize, PartialEq, Default)]
    #[serde(deny_unknown_fields, default)]
    struct Nested {
        url: String,
        enabled: bool,
    }

    impl Default for Sample {
        fn default() -> Self {
            Sample {
                name: "default".into(),
                port: 1,
                grace: Duration::from_secs(5),
                nested: Nested::default(),
            }
        }
    }

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn toml_file(text: &str) -> tempfile_path::TempToml {
        tempfile_path::TempToml::new(text)
    }

    /// A tiny self-deleting TOML file, so this crate needs no tempfile dependency.
    mod tempfile_path {
        use super::*;
        pub struct TempToml(pub PathBuf);
        impl TempToml {
            pub fn new(text: &str) -> Self {
                let path = std::env::temp_dir().join(format!(
                    "liftwire-config-test-{}-{:?}.toml",
                    std::process::id(),
                    std::thread::current().id()
                ));
                let mut f = std::fs::File::create(&path).unwrap();
                f.write_all(text.as_bytes()).unwrap();
                TempToml(path)
            }
        }
        impl Drop for TempToml {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
    }

    #[test]
    fn defaults_then_file_then_environment() {
        let file = toml_file("name = \"from-file\"\nport = 2\n[nested]\nurl = \"nats://file\"\n");
        let vars = env(&[
            ("LIFTWIRE_SAMPLE__PORT", "4222"),
            ("LIFTWIRE_SAMPLE__NESTED__ENABLED", "true"),
            ("LIFTWIRE_SAMPLE__GRACE", "1m 30s"),
            ("LIFTWIRE_OTHER__PORT", "not for us"),
            ("UNRELATED", "x"),
        ]);
        let cfg: Sample = load("sample", Some(&file.0), &vars).unwrap();
        assert_eq!(
            cfg,
            Sample {
                name: "from-file".into(),
                port: 4222,
                grace: Duration::from_secs(90),
                nested: Nested {
                    url: "nats://file".into(),
                    enabled: true
                },
            }
        );
    }

    #[test]
    fn quoted_numeric_looking_strings_stay_strings() {
        let vars = env(&[("LIFTWIRE_SAMPLE__NAME", "\"0042\"")]);
        let cfg: Sample = load("sample", None, &vars).unwrap();
        assert_eq!(cfg.name, "0042");
    }

    #[test]
    fn unknown_keys_are_errors_naming_their_source() {
        let vars = env(&[("LIFTWIRE_SAMPLE__NESTED__URLL", "x")]);
        let err = load::<Sample>("sample", None, &vars)
            .unwrap_err()
            .to_string();
        assert!(err.contains("urll"), "{err}");
        assert!(err.contains("LIFTWIRE_SAMPLE__NESTED__URLL"), "{err}");

        let file = toml_file("prot = 3\n");
        let err = load::<Sample>("sample", Some(&file.0), &env(&[]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("prot") && err.contains("TOML"), "{err}");
    }

    #[test]
    fn mistyped_values_and_missing_files_are_errors() {
        let vars = env(&[("LIFTWIRE_SAMPLE__PORT", "70000")]);
        let err = load::<Sample>("sample", None, &vars)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("port") && err.contains("LIFTWIRE_SAMPLE__PORT"),
            "{err}"
        );

        let err = load::<Sample>(
            "sample",
            Some(Path::new("/nonexistent/liftwire.toml")),
            &env(&[]),
        )
        .unwrap_err();
        assert!(matches!(err, ConfigError::MissingFile(_)));
    }
}
