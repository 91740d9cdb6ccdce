//! "Did you mean …?": the nearest known name to a mistyped one.

/// The candidate closest to `word` by edit distance (Damerau–Levenshtein, so a swapped pair of
/// letters counts once), when it is close enough to be a plausible typo: at most one edit per
/// three characters of `word` (at least one), or the same word with `_` for `-`. Ties go to the
/// first candidate.
pub fn did_you_mean<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    let limit = (word.chars().count() / 3).max(1);
    let normal = word.replace('_', "-").to_lowercase();
    candidates
        .into_iter()
        .filter(|c| *c != word)
        .map(|c| {
            let d = if c.replace('_', "-").to_lowercase() == normal {
                0
            } else {
                strsim::damerau_levenshtein(word, c)
            };
            (d, c)
        })
        .filter(|&(d, _)| d <= limit)
        .min_by_key(|&(d, _)| d)
        .map(|(_, c)| c)
}

/// `did you mean `x`? ` for a hint, or nothing.
pub fn hint_prefix<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> String {
    match did_you_mean(word, candidates) {
        Some(c) => format!("did you mean `{c}`? "),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::did_you_mean;

    #[test]
    fn close_names_are_suggested_and_far_ones_are_not() {
        let strategies = [
            "sparse-mean",
            "mean",
            "ties",
            "dare-ties",
            "task-arithmetic",
        ];
        assert_eq!(did_you_mean("tie", strategies), Some("ties"));
        assert_eq!(did_you_mean("sparse_mean", strategies), Some("sparse-mean"));
        assert_eq!(
            did_you_mean("tasc-arithmetic", strategies),
            Some("task-arithmetic")
        );
        assert_eq!(did_you_mean("mena", strategies), Some("mean"));
        assert_eq!(did_you_mean("svd", strategies), None);
        assert_eq!(did_you_mean("sst", ["sst2", "mnli"]), Some("sst2"));
        assert_eq!(did_you_mean("ties", ["ties"]), None);
    }
}
