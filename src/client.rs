//! The broker's own client side, used by the `token`, `status` and `health`
//! commands: a tonic channel over the Unix socket.

use std::path::{Path, PathBuf};

use tonic::transport::{Channel, Endpoint};

use crate::proto::token_broker_client::TokenBrokerClient;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    #[error("cannot connect to token-broker at {}: {reason} (is the daemon running? pass --socket or set TOKEN_BROKER_SOCKET)", path.display())]
    Connect { path: PathBuf, reason: String },
    #[error("{}: {}", code_name(.0.code()), .0.message())]
    Status(#[from] tonic::Status),
}

/// The canonical upper-case name of a gRPC code, as grpcurl prints it.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// A channel to the broker's socket.
pub async fn channel(path: &Path) -> Result<Channel, ClientError> {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let connect_error = |reason: String| ClientError::Connect {
        path: absolute.clone(),
        reason,
    };
    let endpoint = Endpoint::from_shared(format!("unix://{}", absolute.display()))
        .map_err(|e| connect_error(e.to_string()))?;
    endpoint.connect().await.map_err(|e| {
        let mut reason = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            reason = s.to_string();
            source = s.source();
        }
        connect_error(reason)
    })
}

/// A TokenBroker client on the broker's socket.
pub async fn connect(path: &Path) -> Result<TokenBrokerClient<Channel>, ClientError> {
    Ok(TokenBrokerClient::new(channel(path).await?))
}
