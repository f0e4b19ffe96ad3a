//! [`LoadReport`]: what loading an adapter applied, and what it did not.

use std::fmt;

/// What an adapter load applied and what it left out. Missing tensors are errors before a report exists; the
/// report lists what was loaded, what in the files was not used, and config keys that were read but have no
/// effect here. [`LoadReport::check_strict`] turns anything not applied into an error (the CLI's `--strict`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// Tensors loaded, by file key.
    pub applied: Vec<String>,
    /// Tensors in the file that no part of the adapter uses.
    pub unexpected: Vec<String>,
    /// Config keys that were read and ignored (with the reason), e.g. PEFT options with no effect here.
    pub ignored_config: Vec<String>,
    /// Other warnings (a setting reset as PEFT resets it, a layout converted on load, ...).
    pub warnings: Vec<String>,
}

impl LoadReport {
    /// True when every tensor was applied and nothing was ignored or warned about.
    pub fn is_clean(&self) -> bool {
        self.unexpected.is_empty() && self.ignored_config.is_empty() && self.warnings.is_empty()
    }

    /// One line per item that was not applied (unexpected tensors, ignored config keys, warnings).
    pub fn problems(&self) -> Vec<String> {
        let mut v: Vec<String> = self.unexpected.iter().map(|k| format!("unexpected tensor `{k}` ignored")).collect();
        v.extend(self.ignored_config.iter().map(|k| format!("config: {k}")));
        v.extend(self.warnings.iter().cloned());
        v
    }

    /// `Err(summary)` when the report is not clean.
    ///
    /// # Errors
    /// The problems joined into one message.
    pub fn check_strict(&self) -> Result<(), String> {
        if self.is_clean() {
            Ok(())
        } else {
            Err(self.problems().join("; "))
        }
    }

    /// Appends another report (several adapters loaded together).
    pub fn extend(&mut self, other: LoadReport) {
        self.applied.extend(other.applied);
        self.unexpected.extend(other.unexpected);
        self.ignored_config.extend(other.ignored_config);
        self.warnings.extend(other.warnings);
    }
}

impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} tensors applied", self.applied.len())?;
        for p in self.problems() {
            write!(f, "\n  warning: {p}")?;
        }
        Ok(())
    }
}
