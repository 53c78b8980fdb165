//! The command line.
//!
//! ```text
//! token-broker serve [--config FILE] [--socket PATH] [--demo]
//! token-broker token --audience AUD [--identity NAME] [--socket PATH] [--min-valid 10m] [--json]
//! token-broker status [--socket PATH] [--json]
//! token-broker health [--socket PATH]
//! token-broker check-config [--config FILE]
//! token-broker emulator [--listen ADDR] [--service-account-key FILE ...]
//! token-broker emulator --write-key FILE --client-email EMAIL [--token-uri URL]
//! ```
//!
//! Exit codes: 0 success, 1 a runtime failure (the server's error, no
//! connection, not serving), 2 bad usage or configuration.

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::ExitCode,
    time::{Duration, SystemTime},
};

use clap::{Args, Parser, Subcommand};

use crate::{
    client::{self, ClientError},
    clock::Clock,
    config::{self, Overrides, Settings},
    logging, proto,
    server::{self, Prepared, Server},
};

#[derive(Debug, Parser)]
#[command(
    name = "token-broker",
    version,
    about = "Keeps Google-signed ID tokens fresh and serves them over gRPC on a Unix socket"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon.
    Serve(ServeArgs),
    /// Print an ID token for an audience (like `gcloud auth print-identity-token`).
    Token(TokenArgs),
    /// List cached tokens: identity, audience, state, expiry. Never token text.
    Status(StatusArgs),
    /// Exit 0 when the daemon reports SERVING, 1 otherwise (for probes).
    Health(ClientArgs),
    /// Validate a config file and print what `serve` would run.
    CheckConfig(CheckConfigArgs),
    /// Run the local stand-in for Google's metadata server and token endpoint.
    Emulator(EmulatorArgs),
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// TOML config file; without one, application default credentials are used.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Socket path (overrides the config and TOKEN_BROKER_SOCKET).
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// Start the built-in emulator and serve a throwaway identity from it.
    #[arg(long)]
    pub demo: bool,
}

#[derive(Debug, Args)]
pub struct ClientArgs {
    /// Socket path; else TOKEN_BROKER_SOCKET, else the config's, else the default.
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// Config file to read the socket path from.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct TokenArgs {
    /// The audience the token is for, e.g. https://my-svc-abc-uc.a.run.app
    #[arg(long, short, required_unless_present = "access")]
    pub audience: Option<String>,
    /// Ask for an OAuth2 access token instead of an ID token (a policy rule
    /// must grant its scopes).
    #[arg(long, conflicts_with = "audience")]
    pub access: bool,
    /// Scopes of the access token, comma-separated or repeated; default
    /// https://www.googleapis.com/auth/cloud-platform.
    #[arg(long, requires = "access", value_delimiter = ',')]
    pub scopes: Vec<String>,
    /// The configured identity to use.
    #[arg(long, short, default_value = crate::domain::DEFAULT_IDENTITY)]
    pub identity: String,
    /// Minimum life the token must have left, e.g. 10m.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub min_valid: Option<Duration>,
    /// Print JSON with the token, its expiry and issue time.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Debug, Args)]
pub struct CheckConfigArgs {
    #[arg(long, short)]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct EmulatorArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8181")]
    pub listen: SocketAddr,
    /// Register a service-account key file (its public key), as uploading it to Google would.
    #[arg(long = "service-account-key")]
    pub service_account_keys: Vec<PathBuf>,
    /// Lifetime of issued ID tokens.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    pub token_lifetime: Duration,
    /// Write a fresh service-account key file and exit.
    #[arg(long, requires = "client_email")]
    pub write_key: Option<PathBuf>,
    /// The account email for --write-key.
    #[arg(long)]
    pub client_email: Option<String>,
    /// token_uri for --write-key (default: this emulator's /token at --listen).
    #[arg(long)]
    pub token_uri: Option<String>,
}

/// Runs a parsed command line to its exit code.
pub fn run(cli: Cli) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let code = runtime.block_on(async move {
        match cli.command {
            Command::Serve(args) => serve(args).await,
            Command::Token(args) => report(token(args).await),
            Command::Status(args) => report(status(args).await),
            Command::Health(args) => health(args).await,
            Command::CheckConfig(args) => check_config(args),
            Command::Emulator(args) => emulator(args).await,
        }
    });
    // Lines still queued for the log writer thread are written before exit.
    logging::flush();
    code
}

fn report(result: Result<(), ClientError>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

fn usage_error(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::from(2)
}

async fn serve(args: ServeArgs) -> ExitCode {
    let env = config::process_env();
    let overrides = Overrides {
        socket_path: args.socket.clone(),
    };
    let mut settings = match Settings::load(args.config.as_deref(), &env, &overrides) {
        Ok(s) => s,
        Err(e) => return usage_error(e),
    };
    logging::init(&settings.log);
    let demo = if args.demo {
        match crate::demo::Demo::start(&mut settings).await {
            Ok(demo) => Some(demo),
            Err(e) => {
                eprintln!("error: cannot start the demo emulator: {e}");
                return ExitCode::from(1);
            }
        }
    } else {
        None
    };
    let prepared = match Prepared::new(settings, &env, Clock::system()) {
        Ok(p) => p,
        Err(e) => return usage_error(e),
    };
    for (identity, source) in &prepared.identities {
        tracing::info!(identity = %identity.name, source = %identity.source, upstream = source.upstream(), account = source.account(), "identity");
    }
    let stop = match server::stop_signal() {
        Ok(stop) => stop,
        Err(e) => {
            eprintln!("error: cannot install signal handlers: {e}");
            return ExitCode::from(1);
        }
    };
    server::raise_descriptor_limit();
    let server = match Server::bind(prepared) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    // SIGHUP re-reads the same file with the same flags; the demo has no
    // file of its own to reload.
    let server = match (&args.config, args.demo) {
        (Some(path), false) => {
            let path = path.clone();
            server.with_reload(Box::new(move || {
                let env = config::process_env();
                let settings = Settings::load(Some(&path), &env, &overrides)?;
                Prepared::new(settings, &env, Clock::system())
            }))
        }
        _ => server,
    };
    if let Some(demo) = &demo {
        demo.announce(server.socket_path());
    }
    let result = server.run(stop).await;
    if let Some(demo) = demo {
        demo.stop().await;
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

/// Socket for client commands: flag, env, the config file's, default.
fn client_socket(args: &ClientArgs) -> Result<PathBuf, ClientError> {
    let env = config::process_env();
    let configured = match &args.config {
        Some(path) => {
            Settings::load(Some(path), &env, &Overrides::default())
                .map_err(|e| ClientError::Connect {
                    path: path.clone(),
                    reason: e.to_string(),
                })?
                .server
                .socket_path
        }
        None => None,
    };
    Ok(config::resolve_socket_path(
        args.socket.as_deref(),
        &env,
        configured.as_deref(),
    ))
}

async fn token(args: TokenArgs) -> Result<(), ClientError> {
    let mut client = client::connect(&client_socket(&args.client)?).await?;
    let min_valid_for = args
        .min_valid
        .and_then(|d| prost_types::Duration::try_from(d).ok());
    if args.access {
        let request = proto::GetAccessTokenRequest {
            identity: args.identity,
            scopes: args.scopes,
            min_valid_for,
        };
        let token = client.get_access_token(request).await?.into_inner();
        if args.json {
            let json = serde_json::json!({
                "token": token.token,
                "identity": token.identity,
                "scopes": token.scopes,
                "expire_time": rfc3339(token.expire_time.as_ref()),
            });
            println!("{json}");
        } else {
            println!("{}", token.token);
        }
        return Ok(());
    }
    let request = proto::GetIdTokenRequest {
        audience: args.audience.unwrap_or_default(),
        identity: args.identity,
        min_valid_for,
    };
    let token = client.get_id_token(request).await?.into_inner();
    if args.json {
        let json = serde_json::json!({
            "token": token.token,
            "identity": token.identity,
            "audience": token.audience,
            "expire_time": rfc3339(token.expire_time.as_ref()),
            "issue_time": rfc3339(token.issue_time.as_ref()),
        });
        println!("{json}");
    } else {
        println!("{}", token.token);
    }
    Ok(())
}

async fn status(args: StatusArgs) -> Result<(), ClientError> {
    let mut client = client::connect(&client_socket(&args.client)?).await?;
    // Page through: one reply for 100,000 entries would exceed gRPC's 4 MiB.
    let mut tokens = Vec::new();
    let mut page_token = String::new();
    loop {
        let reply = client
            .list_tokens(proto::ListTokensRequest {
                page_size: 0,
                page_token,
            })
            .await?
            .into_inner();
        tokens.extend(reply.tokens);
        if reply.next_page_token.is_empty() {
            break;
        }
        page_token = reply.next_page_token;
    }
    if args.json {
        let rows: Vec<_> = tokens
            .iter()
            .map(|t| {
                serde_json::json!({
                    "identity": t.identity,
                    "audience": t.audience,
                    "scopes": t.scopes,
                    "kind": if t.scopes.is_empty() { "id_token" } else { "access_token" },
                    "state": state_name(t.state),
                    "expire_time": rfc3339(t.expire_time.as_ref()),
                    "issue_time": rfc3339(t.issue_time.as_ref()),
                    "last_error": t.last_error,
                })
            })
            .collect();
        println!("{}", serde_json::Value::Array(rows));
        return Ok(());
    }
    if tokens.is_empty() {
        println!("no cached tokens");
        return Ok(());
    }
    println!(
        "{:<12} {:<8} {:<22} {:<10} AUDIENCE (or access token: SCOPES)",
        "IDENTITY", "STATE", "EXPIRES", "IN"
    );
    let now = SystemTime::now();
    for t in &tokens {
        let expires = t
            .expire_time
            .as_ref()
            .and_then(|ts| SystemTime::try_from(*ts).ok());
        let left = expires
            .and_then(|e| e.duration_since(now).ok())
            .map(|d| humantime::format_duration(Duration::from_secs(d.as_secs())).to_string())
            .unwrap_or_else(|| "-".into());
        println!(
            "{:<12} {:<8} {:<22} {:<10} {}",
            t.identity,
            state_name(t.state),
            table_time(t.expire_time.as_ref()),
            left,
            if t.scopes.is_empty() {
                t.audience.clone()
            } else {
                format!("access token: {}", t.scopes.join(" "))
            }
        );
        if !t.last_error.is_empty() {
            println!("{:<12} last error: {}", "", t.last_error);
        }
    }
    Ok(())
}

async fn health(args: ClientArgs) -> ExitCode {
    use tonic_health::pb::{
        health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
    };
    let result = async {
        let channel = client::channel(&client_socket(&args)?).await?;
        let response = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await?;
        Ok::<_, ClientError>(response.into_inner().status())
    }
    .await;
    match result {
        Ok(ServingStatus::Serving) => {
            println!("SERVING");
            ExitCode::SUCCESS
        }
        Ok(other) => {
            println!("{}", other.as_str_name());
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

fn check_config(args: CheckConfigArgs) -> ExitCode {
    let env = config::process_env();
    let settings = match Settings::load(args.config.as_deref(), &env, &Overrides::default()) {
        Ok(s) => s,
        Err(e) => return usage_error(e),
    };
    if settings.identities.is_empty() {
        println!("no identities configured: using application default credentials");
    }
    match Prepared::new(settings, &env, Clock::system()) {
        Ok(prepared) => {
            print!("{}", prepared.describe());
            println!("configuration OK");
            ExitCode::SUCCESS
        }
        Err(e) => usage_error(e),
    }
}

async fn emulator(args: EmulatorArgs) -> ExitCode {
    use crate::emulator::{self, Emulator, EmulatorOptions, ServiceAccountRegistration};
    logging::init(&config::LogSettings::default());
    if let Some(path) = &args.write_key {
        let email = args.client_email.as_deref().unwrap_or_default();
        let token_uri = args
            .token_uri
            .clone()
            .unwrap_or_else(|| format!("http://{}/token", args.listen));
        return match emulator::write_key_file(path, email, &token_uri) {
            Ok(_) => {
                println!(
                    "wrote a service-account key for {email} to {} (token_uri {token_uri})",
                    path.display()
                );
                ExitCode::SUCCESS
            }
            Err(e) => usage_error(e),
        };
    }
    let mut service_accounts = Vec::new();
    for path in &args.service_account_keys {
        match ServiceAccountRegistration::from_key_file(path) {
            Ok(reg) => service_accounts.push(reg),
            Err(e) => return usage_error(format!("{}: {e}", path.display())),
        }
    }
    let options = EmulatorOptions {
        listen: args.listen,
        token_lifetime: args.token_lifetime,
        service_accounts,
        ..EmulatorOptions::default()
    };
    // Handlers first: a SIGTERM sent as soon as the banner appears must stop
    // the emulator cleanly, not kill it with the default action.
    let stop = match server::stop_signal() {
        Ok(stop) => stop,
        Err(e) => {
            eprintln!("error: cannot install signal handlers: {e}");
            return ExitCode::from(1);
        }
    };
    let running = match Emulator::start(options).await {
        Ok(e) => e,
        Err(e) => {
            eprintln!("error: cannot start the emulator: {e}");
            return ExitCode::from(1);
        }
    };
    // The banner is for a person or a test harness; a closed stdout must
    // not stop the emulator, so write errors are ignored.
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "emulator listening on {}", running.base_url());
        let _ = writeln!(
            out,
            "  metadata server: GCE_METADATA_HOST={}",
            running.metadata_host()
        );
        let _ = writeln!(out, "  token endpoint:  {}", running.token_uri());
        let _ = writeln!(
            out,
            "  certs:           {0}/oauth2/v1/certs and {0}/oauth2/v3/certs",
            running.base_url()
        );
        let _ = out.flush();
    }
    stop.await;
    running.shutdown().await;
    ExitCode::SUCCESS
}

fn state_name(state: i32) -> &'static str {
    match proto::TokenState::try_from(state) {
        Ok(proto::TokenState::Fresh) => "fresh",
        Ok(proto::TokenState::Stale) => "stale",
        Ok(proto::TokenState::Expired) => "expired",
        Ok(proto::TokenState::Failed) => "failed",
        _ => "pending",
    }
}

/// A protocol timestamp in RFC 3339, or `None` for one that names no time
/// RFC 3339 can write (any `Timestamp` a server sends must print, not panic).
fn rfc3339(ts: Option<&prost_types::Timestamp>) -> Option<String> {
    crate::token::rfc3339(SystemTime::try_from(*ts?).ok()?)
}

/// [`rfc3339`] for the status table: "-" when absent, the raw seconds when
/// out of range.
fn table_time(ts: Option<&prost_types::Timestamp>) -> String {
    match ts {
        None => "-".into(),
        Some(t) => rfc3339(Some(t)).unwrap_or_else(|| format!("out of range ({}s)", t.seconds)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        #[test]
        fn any_protocol_timestamp_formats_without_panicking(seconds: i64, nanos: i32) {
            let ts = prost_types::Timestamp { seconds, nanos };
            let _ = rfc3339(Some(&ts));
            proptest::prop_assert!(!table_time(Some(&ts)).is_empty());
        }
    }

    #[test]
    fn extreme_timestamps_are_named_not_formatted() {
        for (seconds, nanos) in [
            (i64::MAX, i32::MAX),
            (i64::MIN, i32::MIN),
            (-1, 0),
            (253_402_300_800, 0),
        ] {
            let ts = prost_types::Timestamp { seconds, nanos };
            assert_eq!(rfc3339(Some(&ts)), None, "{ts:?}");
            assert!(table_time(Some(&ts)).starts_with("out of range"), "{ts:?}");
        }
        let ts = prost_types::Timestamp {
            seconds: 1_800_000_000,
            nanos: 0,
        };
        assert_eq!(rfc3339(Some(&ts)).as_deref(), Some("2027-01-15T08:00:00Z"));
    }
}
