//! `ListTokens` in pages. Keyset paging over the entries a caller may read,
//! ordered by (identity, audience), an access token's scope set standing in
//! for its audience behind a leading space (which no audience holds, so the
//! two kinds never tie): the page token names the last key a page held, so entries added or evicted between calls never shift a page, and
//! each page costs one pass over the cache plus a partial sort of the page.

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine as _};
use tonic::Status;

use std::borrow::Cow;

use crate::{
    cache::{EntryInfo, MAX_SCOPES, MAX_SCOPE_LEN},
    domain::MAX_AUDIENCE_LEN,
};

/// The second half of an entry's place in the order: its audience, or a
/// space and its scope set.
fn target(info: &EntryInfo) -> Cow<'_, str> {
    match info.key.scopes() {
        Some(scopes) => Cow::Owned(format!(" {scopes}")),
        None => Cow::Borrowed(info.key.audience()),
    }
}

/// Entries in a page when the request asks for none.
pub const DEFAULT_PAGE_SIZE: usize = 500;
/// Most entries in a page. An entry is at most ~2.3 KB on the wire (a
/// 2,048-byte audience, a 64-byte identity, an error message), so a page
/// stays well under gRPC's default 4 MiB message limit.
pub const MAX_PAGE_SIZE: usize = 1000;

/// The requested page size, defaulted and capped.
pub fn page_size(requested: i32) -> Result<usize, Status> {
    match requested {
        0 => Ok(DEFAULT_PAGE_SIZE),
        n if n < 0 => Err(Status::invalid_argument(format!(
            "page_size is {n}; it must be 0 (the default, {DEFAULT_PAGE_SIZE}) or more"
        ))),
        n => Ok((n as usize).min(MAX_PAGE_SIZE)),
    }
}

/// The key a page token resumes after: (identity, audience).
pub fn decode_token(token: &str) -> Result<Option<(String, String)>, Status> {
    if token.is_empty() {
        return Ok(None);
    }
    let invalid = || {
        Status::invalid_argument(
            "page_token is not a next_page_token this server issued; start again with an empty one",
        )
    };
    // An identity name is at most 64 bytes, an audience 2,048; with the
    // separator and base64's 4/3 that bounds a genuine token.
    let longest = MAX_AUDIENCE_LEN.max(MAX_SCOPES * (MAX_SCOPE_LEN + 1));
    if token.len() > (longest + 128) * 4 / 3 + 4 {
        return Err(invalid());
    }
    let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| invalid())?;
    let text = String::from_utf8(bytes).map_err(|_| invalid())?;
    let (identity, audience) = text.split_once('\n').ok_or_else(invalid)?;
    Ok(Some((identity.to_owned(), audience.to_owned())))
}

fn encode_token(info: &EntryInfo) -> String {
    URL_SAFE_NO_PAD.encode(format!("{}\n{}", info.key.identity(), target(info)))
}

/// One page of `entries` (any order) after `after`, and the token for the
/// next page when more remain.
pub fn page(
    entries: Vec<EntryInfo>,
    after: Option<&(String, String)>,
    size: usize,
) -> (Vec<EntryInfo>, String) {
    let sort_key = |info: &EntryInfo| (info.key.identity().to_owned(), target(info).into_owned());
    let mut rest: Vec<EntryInfo> = entries
        .into_iter()
        .filter(|info| {
            after.is_none_or(|after| {
                (info.key.identity(), target(info).as_ref()) > (after.0.as_str(), after.1.as_str())
            })
        })
        .collect();
    let more = rest.len() > size;
    if more {
        // Only the page needs sorting: select its members first.
        rest.select_nth_unstable_by(size, |a, b| {
            (a.key.identity(), target(a)).cmp(&(b.key.identity(), target(b)))
        });
        rest.truncate(size);
    }
    rest.sort_by_cached_key(sort_key);
    let next = match rest.last() {
        Some(last) if more => encode_token(last),
        _ => String::new(),
    };
    (rest, next)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::{CacheKey, EntryState};

    fn entry(identity: &str, audience: &str) -> EntryInfo {
        EntryInfo {
            key: CacheKey::new(identity, audience).unwrap(),
            issued_at: None,
            expires_at: None,
            state: EntryState::Fresh,
            last_error: None,
        }
    }

    fn audiences(page: &[EntryInfo]) -> Vec<String> {
        page.iter()
            .map(|e| format!("{}/{}", e.key.identity(), e.key.audience()))
            .collect()
    }

    #[test]
    fn access_entries_and_audiences_of_the_same_text_never_tie() {
        let access = |scopes: &str| EntryInfo {
            key: CacheKey::access("a", crate::source::access::AccessOf::Identity, scopes).unwrap(),
            ..entry("a", "unused")
        };
        let entries = vec![entry("a", "x"), access("x"), access("w x"), entry("a", "w")];
        let mut seen = Vec::new();
        let mut after = None;
        loop {
            let (page, next) = page(entries.clone(), after.as_ref(), 1);
            seen.extend(page.iter().map(|e| format!("{:?}", e.key)));
            if next.is_empty() {
                break;
            }
            after = decode_token(&next).unwrap();
        }
        assert_eq!(seen.len(), 4, "each entry once: {seen:?}");
        let unique: std::collections::HashSet<_> = seen.iter().collect();
        assert_eq!(unique.len(), 4, "{seen:?}");
    }

    #[test]
    fn pages_cover_every_entry_once_in_order() {
        let entries: Vec<_> = (0..25)
            .rev()
            .map(|i| {
                entry(
                    if i % 2 == 0 { "a" } else { "b" },
                    &format!("https://{i:02}"),
                )
            })
            .collect();
        let mut seen = Vec::new();
        let mut after = None;
        loop {
            let (page, next) = page(entries.clone(), after.as_ref(), 4);
            assert!(page.len() <= 4);
            seen.extend(audiences(&page));
            if next.is_empty() {
                break;
            }
            after = decode_token(&next).unwrap();
        }
        let mut expected = audiences(&entries);
        expected.sort();
        assert_eq!(seen, expected);
    }

    #[test]
    fn an_entry_evicted_between_pages_shifts_nothing() {
        let entries: Vec<_> = (0..6)
            .map(|i| entry("a", &format!("https://{i}")))
            .collect();
        let (first, next) = page(entries.clone(), None, 3);
        assert_eq!(
            audiences(&first),
            ["a/https://0", "a/https://1", "a/https://2"]
        );
        let after = decode_token(&next).unwrap();
        let remaining: Vec<_> = entries
            .into_iter()
            .filter(|e| e.key.audience() != "https://1")
            .collect();
        let (second, next) = page(remaining, after.as_ref(), 3);
        assert_eq!(
            audiences(&second),
            ["a/https://3", "a/https://4", "a/https://5"]
        );
        assert!(next.is_empty());
    }

    #[test]
    fn sizes_and_bad_tokens() {
        assert_eq!(page_size(0).unwrap(), DEFAULT_PAGE_SIZE);
        assert_eq!(page_size(5).unwrap(), 5);
        assert_eq!(page_size(1_000_000).unwrap(), MAX_PAGE_SIZE);
        assert!(page_size(-1).is_err());
        for bad in ["%%%", "bm8tbmV3bGluZQ", &"A".repeat(10_000)] {
            let err = decode_token(bad).unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument, "{bad}");
        }
    }
}
