//! Property tests: the audience validator, the policy's pattern matcher and
//! config parsing never panic, whatever the input, and agree with their
//! specifications on generated cases.

use std::collections::HashMap;

use proptest::prelude::*;
use token_broker::{
    config::{Overrides, Settings},
    domain::validate_audience,
    policy::AudiencePattern,
};

proptest! {
    #[test]
    fn the_audience_validator_never_panics_and_is_exact(audience in any::<String>()) {
        let ok = validate_audience(&audience).is_ok();
        let expected = !audience.is_empty()
            && audience.len() <= 2048
            && !audience.chars().any(|c| c.is_whitespace() || c.is_control());
        prop_assert_eq!(ok, expected);
    }

    #[test]
    fn patterns_never_panic(pattern in any::<String>(), audience in any::<String>()) {
        if let Ok(p) = AudiencePattern::parse(&pattern) {
            let _ = p.matches(&audience);
        }
    }

    #[test]
    fn a_star_matches_exactly_one_label(label in "[a-z0-9-]{1,20}", extra in "[a-z0-9-]{1,10}") {
        let p = AudiencePattern::parse("https://*.a.run.app").unwrap();
        let one_label = format!("https://{label}.a.run.app");
        let two_labels = format!("https://{label}.{extra}.a.run.app");
        let suffixed = format!("https://{label}.a.run.app.{extra}.com");
        prop_assert!(p.matches(&one_label));
        prop_assert!(!p.matches(&two_labels));
        prop_assert!(!p.matches(&suffixed));
    }

    #[test]
    fn a_star_matches_exactly_dns_label_characters(label in any::<String>()) {
        let p = AudiencePattern::parse("https://*.a.run.app").unwrap();
        let expected = !label.is_empty()
            && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
        prop_assert_eq!(p.matches(&format!("https://{label}.a.run.app")), expected);
    }

    #[test]
    fn config_parsing_never_panics(text in any::<String>()) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, &text).unwrap();
        if let Ok(settings) = Settings::load(Some(&path), &HashMap::new(), &Overrides::default()) {
            let _ = settings.validate();
        }
    }

    #[test]
    fn structured_configs_never_panic(
        key in prop::sample::select(vec!["socket_mode", "socket_path", "jitter", "max_entries", "filter", "audiences", "uids"]),
        value in prop_oneof![any::<i64>().prop_map(|v| v.to_string()), "\"[^\"\\\\]{0,40}\"", Just("[]".to_owned()), Just("[\"*\"]".to_owned())],
        section in prop::sample::select(vec!["server", "refresh", "log", "limits", "[policy]"]),
    ) {
        let (open, close) = if section.starts_with('[') { ("[", "]") } else { ("", "") };
        let text = format!("[{open}{}{close}]\n{key} = {value}\n", section.trim_matches(|c| c == '[' || c == ']'));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, &text).unwrap();
        if let Ok(settings) = Settings::load(Some(&path), &HashMap::new(), &Overrides::default()) {
            let _ = settings.validate();
        }
    }
}
