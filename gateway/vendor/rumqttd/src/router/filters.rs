//! liftwire patch: subscription filters indexed by their shape, so that a published topic finds
//! its filters without matching it against every filter the router knows (see PATCHES.md, 7).

use std::collections::HashMap;

use crate::protocol::matches;

/// Position of a filter's data in the router (`router::FilterIdx`).
type FilterIdx = usize;

/// Every filter, filed by shape. A topic's filters are found with two hash lookups, plus a
/// scan of the few filters of any other shape.
#[derive(Debug, Default)]
pub struct FilterIndex {
    /// Filters without wildcards, by the one topic each matches.
    exact: HashMap<String, FilterIdx>,
    /// Filters whose only wildcard is a `+` as last level, by everything before it
    /// (`a/b/+` under `a/b/`).
    last_plus: HashMap<String, FilterIdx>,
    /// Every other filter, matched one by one.
    others: Vec<(String, FilterIdx)>,
}

impl FilterIndex {
    /// Files `filter` (a valid MQTT filter, new to the index) as `idx`.
    pub fn insert(&mut self, filter: &str, idx: FilterIdx) {
        let wildcard = |s: &str| s.contains(['+', '#']);
        if !wildcard(filter) {
            self.exact.insert(filter.to_owned(), idx);
            return;
        }
        match filter.strip_suffix('+') {
            Some(prefix) if (prefix.is_empty() || prefix.ends_with('/')) && !wildcard(prefix) => {
                self.last_plus.insert(prefix.to_owned(), idx);
            }
            _ => self.others.push((filter.to_owned(), idx)),
        }
    }

    /// The filters `topic` matches, as [`matches`] decides, in no particular order.
    pub fn matches(&self, topic: &str) -> Vec<FilterIdx> {
        let mut found = Vec::new();
        // `matches` gives `$` topics to no filter.
        if topic.starts_with('$') {
            return found;
        }
        if let Some(&idx) = self.exact.get(topic) {
            found.push(idx);
        }
        let (prefix, last) = topic.split_at(topic.rfind('/').map_or(0, |i| i + 1));
        // A `+` level takes anything but a `#`.
        if last != "#" {
            if let Some(&idx) = self.last_plus.get(prefix) {
                found.push(idx);
            }
        }
        found.extend(
            self.others
                .iter()
                .filter(|(filter, _)| matches(topic, filter))
                .map(|(_, idx)| *idx),
        );
        found
    }
}
