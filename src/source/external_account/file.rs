//! `credential_source.file`: the subject token is read from a file at every
//! exchange, since Kubernetes and other platforms rotate it in place; the
//! file must be one only root or the broker's user can change.

use std::path::PathBuf;

use tokio::io::AsyncReadExt;

use super::{Format, SubjectError, MAX_FILE_BYTES};

#[derive(Clone, Debug)]
pub(crate) struct FileSource {
    pub(crate) path: PathBuf,
    pub(crate) format: Format,
}

impl FileSource {
    pub(crate) async fn read(&self) -> Result<String, SubjectError> {
        let from = format!("subject token file {}", self.path.display());
        // Whoever could replace the file could have the broker exchange
        // their token for the account's (checked at every read: the file
        // and the directories above it are rotated in place).
        let real =
            super::trusted_file(&self.path).map_err(|m| SubjectError::permanent(&from, m))?;
        let file = tokio::fs::File::open(&real)
            .await
            .map_err(|e| SubjectError::permanent(&from, format!("cannot be read: {e}")))?;
        let mut text = String::new();
        file.take(MAX_FILE_BYTES + 1)
            .read_to_string(&mut text)
            .await
            .map_err(|e| SubjectError::permanent(&from, format!("cannot be read: {e}")))?;
        if text.len() as u64 > MAX_FILE_BYTES {
            return Err(SubjectError::permanent(&from, "is too large".into()));
        }
        self.format
            .extract(&text, "the file")
            .map_err(|m| SubjectError::permanent(&from, m))
    }
}
