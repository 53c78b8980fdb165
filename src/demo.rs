//! `serve --demo`: the built-in emulator on a free loopback port, a
//! throwaway service-account key registered with it, and a `default`
//! identity served through the real self-signed-JWT exchange, so a newcomer
//! sees tokens flow with no Google account.

use std::{io::Write, path::Path};

use crate::{
    config::{IdentitySettings, Settings},
    domain::{SourceKind, DEFAULT_IDENTITY},
    emulator::{write_key_file, Emulator, EmulatorOptions},
};

/// The demo's service account.
pub const DEMO_ACCOUNT: &str = "demo@token-broker-demo.iam.gserviceaccount.com";
/// The audience the printed example command asks for.
pub const DEMO_AUDIENCE: &str = "https://demo.example.com";

/// A running demo environment; the key and default socket live in a
/// temporary directory removed on [`Demo::stop`].
pub struct Demo {
    emulator: Emulator,
    dir: tempfile::TempDir,
}

impl Demo {
    /// Starts the emulator, writes and registers a key, and points
    /// `settings` at it (one `default` identity; a socket in the temporary
    /// directory unless one was given).
    pub async fn start(settings: &mut Settings) -> Result<Demo, String> {
        let emulator = Emulator::start(EmulatorOptions::default())
            .await
            .map_err(|e| e.to_string())?;
        let dir = tempfile::Builder::new()
            .prefix("token-broker-demo-")
            .tempdir()
            .map_err(|e| format!("cannot create a temporary directory: {e}"))?;
        let key_file = dir.path().join("demo-service-account.json");
        let registration = write_key_file(&key_file, DEMO_ACCOUNT, &emulator.token_uri())
            .map_err(|e| e.to_string())?;
        emulator.register_service_account(registration);
        settings.identities = vec![IdentitySettings {
            name: DEFAULT_IDENTITY.into(),
            source: SourceKind::ServiceAccountKey,
            key_file: Some(key_file),
            metadata_host: None,
            allow_insecure_key_permissions: false,
        }];
        if settings.server.socket_path.is_none() {
            settings.server.socket_path = Some(dir.path().join("broker.sock"));
        }
        tracing::info!(emulator = %emulator.base_url(), account = DEMO_ACCOUNT, "demo mode: tokens come from the built-in emulator, not Google");
        Ok(Demo { emulator, dir })
    }

    /// Prints the one command that fetches a token from this demo.
    pub fn announce(&self, socket: &Path) {
        let exe = std::env::current_exe()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| "token-broker".into());
        let mut out = std::io::stdout().lock();
        let _ = writeln!(
            out,
            "token-broker demo is ready (emulator at {}, files in {}).\nFetch a token with:\n\n  {exe} token --socket {} --audience {DEMO_AUDIENCE}\n\nStop with Ctrl-C.",
            self.emulator.base_url(),
            self.dir.path().display(),
            socket.display(),
        );
        let _ = out.flush();
    }

    pub async fn stop(self) {
        self.emulator.shutdown().await;
        drop(self.dir);
    }
}
