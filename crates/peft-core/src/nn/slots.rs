//! The adapter list of a site that runs whole adapters in attach order (residual and embedding-output sites):
//! named entries, each on or off, guarded by a lock so sites are shared between model clones and tuners.

use std::sync::{Arc, RwLock};

use crate::error::Result;

/// An adapter as a site's list knows it: by name.
pub(crate) trait Named {
    /// The adapter's name.
    fn slot_name(&self) -> &str;
}

/// A site's path and its adapters, each with an on/off flag.
pub(crate) struct Slots<T: ?Sized> {
    path: String,
    list: RwLock<Vec<(Arc<T>, bool)>>,
}

impl<T: ?Sized + Named> Slots<T> {
    pub(crate) fn new(path: String) -> Self {
        Slots { path, list: RwLock::new(Vec::new()) }
    }

    pub(crate) fn path(&self) -> &str {
        &self.path
    }

    /// Appends `a` (active); [`crate::Error::AdapterState`] when its name is taken.
    pub(crate) fn attach(&self, a: Arc<T>) -> Result<()> {
        let mut l = self.list.write().unwrap_or_else(|p| p.into_inner());
        if l.iter().any(|(b, _)| b.slot_name() == a.slot_name()) {
            return Err(crate::Error::AdapterState {
                op: "attach",
                site: self.path.clone(),
                adapter: a.slot_name().to_string(),
                problem: crate::AdapterProblem::Exists,
            });
        }
        l.push((a, true));
        Ok(())
    }

    /// Removes adapter `name`; [`crate::Error::UnknownName`] when absent.
    pub(crate) fn detach(&self, name: &str) -> Result<Arc<T>> {
        let mut l = self.list.write().unwrap_or_else(|p| p.into_inner());
        let i = l
            .iter()
            .position(|(a, _)| a.slot_name() == name)
            .ok_or_else(|| crate::Error::UnknownName { name: format!("{}: adapter `{name}`", self.path) })?;
        Ok(l.remove(i).0)
    }

    pub(crate) fn activate(&self, name: &str, on: bool) {
        for (a, active) in self.list.write().unwrap_or_else(|p| p.into_inner()).iter_mut() {
            if a.slot_name() == name {
                *active = on;
            }
        }
    }

    pub(crate) fn set_active(&self, names: &[&str]) {
        for (a, on) in self.list.write().unwrap_or_else(|p| p.into_inner()).iter_mut() {
            *on = names.contains(&a.slot_name());
        }
    }

    /// The active adapters, in attach order.
    pub(crate) fn active(&self) -> Vec<Arc<T>> {
        self.list
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(_, on)| *on)
            .map(|(a, _)| a.clone())
            .collect()
    }

    /// Every adapter, in attach order.
    pub(crate) fn all(&self) -> Vec<Arc<T>> {
        self.list.read().unwrap_or_else(|p| p.into_inner()).iter().map(|(a, _)| a.clone()).collect()
    }
}
