//! `credential_source.file`: the subject token is read from a file at every
//! exchange, since Kubernetes and other platforms rotate it in place.

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
        let file = tokio::fs::File::open(&self.path)
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
