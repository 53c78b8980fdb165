//! `credential_source.executable` (google-auth's "pluggable" source): a
//! command prints the subject token as a JSON response. Run only when
//! `GOOGLE_EXTERNAL_ACCOUNT_ALLOW_EXECUTABLES=1` is in the broker's
//! environment, as Google's libraries require, with Google's rules: a
//! 5-120 s timeout (default 30 s); the `GOOGLE_EXTERNAL_ACCOUNT_*`
//! variables set for the command; a still-valid response in `output_file`
//! used instead of running the command; a response without
//! `expiration_time` in that file treated as expired.

use std::{collections::HashMap, path::PathBuf, process::Stdio, time::Duration};

use serde_json::{Map, Value};

use super::SubjectError;
use crate::source::sanitize_upstream_text;

/// Google's gate for running credential executables.
pub const ALLOW_EXECUTABLES_ENV: &str = "GOOGLE_EXTERNAL_ACCOUNT_ALLOW_EXECUTABLES";
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
const MIN_TIMEOUT_MILLIS: u64 = 5_000;
const MAX_TIMEOUT_MILLIS: u64 = 120_000;
const SUPPORTED_VERSION: u64 = 1;
/// Output beyond this is not a token response.
const MAX_OUTPUT_BYTES: usize = 1024 * 1024;

#[derive(Clone, Debug)]
pub(crate) struct ExecutableSource {
    pub(crate) command: String,
    argv: Vec<String>,
    timeout: Duration,
    output_file: Option<PathBuf>,
}

/// What the command is told about the credential it serves.
pub(crate) struct Context<'a> {
    pub(crate) audience: &'a str,
    pub(crate) token_type: &'a str,
    pub(crate) impersonated_email: &'a str,
    pub(crate) now_unix: u64,
}

impl ExecutableSource {
    pub(crate) fn parse(
        fields: &Map<String, Value>,
        env: &HashMap<String, String>,
    ) -> Result<Self, String> {
        if env.get(ALLOW_EXECUTABLES_ENV).map(String::as_str) != Some("1") {
            return Err(format!(
                "credential_source.executable runs a command, which is refused unless {ALLOW_EXECUTABLES_ENV}=1 is in the broker's environment (as in Google's libraries); set it where the broker is started (e.g. Environment= in its systemd unit) to allow it"
            ));
        }
        let command = match fields.get("command") {
            Some(Value::String(c)) if !c.trim().is_empty() => c.clone(),
            _ => return Err("credential_source.executable.command is missing or empty".into()),
        };
        let argv = split_command(&command)
            .ok_or("credential_source.executable.command has an unterminated quote")?;
        // A program named by path must be as trusted as the file naming it.
        if argv[0].contains('/') {
            super::trusted_file(std::path::Path::new(&argv[0])).map_err(|problem| {
                format!(
                    "credential_source.executable.command: {} {problem}",
                    argv[0]
                )
            })?;
        }
        let timeout = match fields.get("timeout_millis") {
            None | Some(Value::Null) => DEFAULT_TIMEOUT,
            Some(value) => match value.as_u64() {
                Some(ms) if (MIN_TIMEOUT_MILLIS..=MAX_TIMEOUT_MILLIS).contains(&ms) => {
                    Duration::from_millis(ms)
                }
                _ => {
                    return Err(
                        "credential_source.executable.timeout_millis: Timeout must be between 5 and 120 seconds."
                            .into(),
                    )
                }
            },
        };
        let output_file = match fields.get("output_file") {
            None | Some(Value::Null) => None,
            Some(Value::String(p)) if !p.is_empty() => Some(PathBuf::from(p)),
            Some(_) => return Err("credential_source.executable.output_file is not a path".into()),
        };
        Ok(Self {
            command,
            argv,
            timeout,
            output_file,
        })
    }

    pub(crate) async fn run(&self, context: &Context<'_>) -> Result<String, SubjectError> {
        let from = format!("executable {:?}", self.command);
        if let Some(path) = &self.output_file {
            // A response cached by an earlier run, used while it is valid.
            if let Ok(text) = tokio::fs::read_to_string(path).await {
                if let Ok(Value::Object(response)) = serde_json::from_str(&text) {
                    match parse_response(&response, context.now_unix) {
                        Ok(token) if response.contains_key("expiration_time") => return Ok(token),
                        Err(Problem::Malformed(m)) => {
                            return Err(SubjectError::permanent(
                                &from,
                                format!("output file {}: {m}", path.display()),
                            ))
                        }
                        _ => {}
                    }
                }
            }
        }
        let mut command = tokio::process::Command::new(&self.argv[0]);
        command
            .args(&self.argv[1..])
            .env("GOOGLE_EXTERNAL_ACCOUNT_AUDIENCE", context.audience)
            .env("GOOGLE_EXTERNAL_ACCOUNT_TOKEN_TYPE", context.token_type)
            .env("GOOGLE_EXTERNAL_ACCOUNT_INTERACTIVE", "0")
            .env("GOOGLE_EXTERNAL_ACCOUNT_REVOKE", "0")
            .env(
                "GOOGLE_EXTERNAL_ACCOUNT_IMPERSONATED_EMAIL",
                context.impersonated_email,
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Some(path) = &self.output_file {
            command.env("GOOGLE_EXTERNAL_ACCOUNT_OUTPUT_FILE", path);
        }
        let output = match tokio::time::timeout(self.timeout, command.output()).await {
            Err(_) => {
                return Err(SubjectError::permanent(
                    &from,
                    format!(
                        "did not finish within {}s (timeout_millis); it was killed",
                        self.timeout.as_secs()
                    ),
                ))
            }
            Ok(Err(e)) => {
                return Err(SubjectError::permanent(
                    &from,
                    format!("cannot be run: {e}"),
                ))
            }
            Ok(Ok(output)) => output,
        };
        if output.stdout.len() > MAX_OUTPUT_BYTES {
            return Err(SubjectError::permanent(&from, "printed too much".into()));
        }
        if !output.status.success() {
            let mut printed = String::from_utf8_lossy(&output.stdout).into_owned();
            printed.push_str(&String::from_utf8_lossy(&output.stderr));
            return Err(SubjectError::permanent(
                &from,
                format!(
                    "Executable exited with non-zero return code {}. Error: {}",
                    output
                        .status
                        .code()
                        .map_or_else(|| "(killed by a signal)".into(), |c| c.to_string()),
                    sanitize_upstream_text(&printed)
                ),
            ));
        }
        let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
        if text.trim().is_empty() {
            if let Some(path) = &self.output_file {
                text = tokio::fs::read_to_string(path).await.unwrap_or_default();
            }
        }
        let Ok(Value::Object(response)) = serde_json::from_str(&text) else {
            return Err(SubjectError::permanent(
                &from,
                "did not print a JSON object response".into(),
            ));
        };
        parse_response(&response, context.now_unix).map_err(|p| {
            SubjectError::permanent(
                &from,
                match p {
                    Problem::Malformed(m) | Problem::Refused(m) => m,
                },
            )
        })
    }
}

enum Problem {
    /// The response breaks the schema: an error even in the output file.
    Malformed(String),
    /// A valid response that yields no token (failure, expiry).
    Refused(String),
}

/// The subject token of an executable response (google-auth's rules).
fn parse_response(response: &Map<String, Value>, now_unix: u64) -> Result<String, Problem> {
    let version = response
        .get("version")
        .and_then(Value::as_u64)
        .ok_or_else(|| {
            Problem::Malformed("The executable response is missing the version field.".into())
        })?;
    if version > SUPPORTED_VERSION {
        return Err(Problem::Refused(format!(
            "Executable returned unsupported version {version}."
        )));
    }
    let success = response
        .get("success")
        .and_then(Value::as_bool)
        .ok_or_else(|| {
            Problem::Malformed("The executable response is missing the success field.".into())
        })?;
    if !success {
        let (Some(code), Some(message)) = (response.get("code"), response.get("message")) else {
            return Err(Problem::Malformed(
                "Error code and message fields are required in the response.".into(),
            ));
        };
        return Err(Problem::Refused(format!(
            "Executable returned unsuccessful response: code: {}, message: {}.",
            sanitize_upstream_text(
                &code
                    .as_str()
                    .map_or_else(|| code.to_string(), str::to_owned)
            ),
            sanitize_upstream_text(message.as_str().unwrap_or_default())
        )));
    }
    if let Some(expiration) = response.get("expiration_time").and_then(Value::as_u64) {
        if expiration < now_unix {
            return Err(Problem::Refused(
                "The token returned by the executable is expired.".into(),
            ));
        }
    }
    let token_type = response
        .get("token_type")
        .and_then(Value::as_str)
        .ok_or_else(|| {
            Problem::Malformed("The executable response is missing the token_type field.".into())
        })?;
    let field = match token_type {
        "urn:ietf:params:oauth:token-type:jwt" | "urn:ietf:params:oauth:token-type:id_token" => {
            "id_token"
        }
        "urn:ietf:params:oauth:token-type:saml2" => "saml_response",
        _ => {
            return Err(Problem::Refused(
                "Executable returned unsupported token type.".into(),
            ))
        }
    };
    response
        .get(field)
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
        .ok_or_else(|| Problem::Malformed(format!("The executable response has no `{field}`.")))
}

/// Splits a command line as a POSIX shell would split words: whitespace
/// separates, quotes group, backslash escapes (outside single quotes).
fn split_command(command: &str) -> Option<Vec<String>> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = command.chars();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                in_word = true;
                loop {
                    match chars.next()? {
                        '\'' => break,
                        c => word.push(c),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next()? {
                        '"' => break,
                        '\\' => word.push(chars.next()?),
                        c => word.push(c),
                    }
                }
            }
            '\\' => {
                in_word = true;
                word.push(chars.next()?);
            }
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            c => {
                in_word = true;
                word.push(c);
            }
        }
    }
    if in_word {
        words.push(word);
    }
    (!words.is_empty()).then_some(words)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_split_like_a_shell() {
        assert_eq!(
            split_command(r#"/bin/tool --flag "a b" 'c d' e\ f"#).unwrap(),
            ["/bin/tool", "--flag", "a b", "c d", "e f"]
        );
        assert!(split_command("tool 'unterminated").is_none());
    }

    #[test]
    fn responses_follow_google_auth_rules() {
        let parse = |v: Value| parse_response(v.as_object().unwrap(), 1000);
        let ok = serde_json::json!({"version": 1, "success": true,
            "token_type": "urn:ietf:params:oauth:token-type:jwt", "id_token": "t", "expiration_time": 2000});
        assert_eq!(parse(ok).ok().unwrap(), "t");
        let expired = serde_json::json!({"version": 1, "success": true,
            "token_type": "urn:ietf:params:oauth:token-type:jwt", "id_token": "t", "expiration_time": 999});
        assert!(matches!(parse(expired), Err(Problem::Refused(m)) if m.contains("expired")));
        let failed =
            serde_json::json!({"version": 1, "success": false, "code": "401", "message": "no"});
        assert!(
            matches!(parse(failed), Err(Problem::Refused(m)) if m.contains("code: \"401\"") && m.contains("message: \"no\""))
        );
        let future = serde_json::json!({"version": 2, "success": true});
        assert!(matches!(parse(future), Err(Problem::Refused(m)) if m.contains("version 2")));
        let no_version = serde_json::json!({"success": true});
        assert!(matches!(parse(no_version), Err(Problem::Malformed(_))));
        let saml = serde_json::json!({"version": 1, "success": true,
            "token_type": "urn:ietf:params:oauth:token-type:saml2", "saml_response": "s"});
        assert_eq!(parse(saml).ok().unwrap(), "s");
    }
}
