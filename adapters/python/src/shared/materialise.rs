//! Materialisation: a connection's state built from a shared template.
//!
//! Leaves are handed out as they are (immutable, one object for every
//! connection); every container is built afresh for each activation,
//! aliasing kept through a memo of container slots; references resolve
//! through the connection's pickle cache exactly as ZODB's `ObjectReader`
//! does (`cache.get(oid)`, else `ObjectReader._persistent_load`, which
//! makes the ghost). The one exception to "containers are copied" is the
//! top-level dict of a state whose class uses `Persistent.__setstate__`
//! unchanged: that method copies the dict's items into the object's own
//! `__dict__` and keeps no reference to the dict, so the template's dict is
//! handed to it as is. Any other `__setstate__` may keep or mutate its
//! argument and gets a fresh copy (invariant 6: shared states are never
//! changed, and no connection sees another's changes).

use super::template::{Node, Ref};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyDict, PyFrozenSet, PyList, PySet, PyTuple};
use std::sync::atomic::{AtomicBool, Ordering};

/// Test switch: share mutable containers between connections instead of
/// copying them (the naive sharing persistent issue #93 warns about). Only
/// `tidecache._native._unsafe_share_containers` sets it, so that the
/// isolation tests can be seen failing.
pub(crate) static UNSAFE_SHARE: AtomicBool = AtomicBool::new(false);

/// What a connection resolves references with; fetched on the first
/// reference of an activation only.
pub(crate) struct Resolver<'a, 'py> {
    py: Python<'py>,
    conn: &'a Bound<'py, PyAny>,
    cache_get: Option<Bound<'py, PyAny>>,
    persistent_load: Option<Bound<'py, PyAny>>,
    memo: Vec<Option<PyObject>>,
    aliased: bool,
}

impl<'a, 'py> Resolver<'a, 'py> {
    /// A resolver for `conn` (a `ZODB.Connection.Connection`) and a
    /// template with `slots` container slots.
    pub(crate) fn new(py: Python<'py>, conn: &'a Bound<'py, PyAny>, slots: u32, aliased: bool) -> Self {
        Resolver {
            py,
            conn,
            cache_get: None,
            persistent_load: None,
            memo: if aliased {
                (0..slots).map(|_| None).collect()
            } else {
                Vec::new()
            },
            aliased,
        }
    }

    fn remember(&mut self, slot: u32, obj: &Bound<'py, PyAny>) {
        if self.aliased {
            self.memo[slot as usize] = Some(obj.clone().unbind());
        }
    }

    fn resolve(&mut self, r: &Ref) -> PyResult<Bound<'py, PyAny>> {
        let py = self.py;
        if let Ref::Oid { oid, .. } = r {
            if self.cache_get.is_none() {
                self.cache_get = Some(self.conn.getattr(intern!(py, "_cache"))?.getattr(intern!(py, "get"))?);
            }
            if let Some(get) = &self.cache_get {
                let found = get.call1((oid.bind(py), py.None()))?;
                if !found.is_none() {
                    return Ok(found);
                }
            }
        }
        if self.persistent_load.is_none() {
            self.persistent_load = Some(
                self.conn
                    .getattr(intern!(py, "_reader"))?
                    .getattr(intern!(py, "_persistent_load"))?,
            );
        }
        let reference = match r {
            Ref::Oid { reference, .. } | Ref::Other(reference) => reference.bind(py),
        };
        match &self.persistent_load {
            Some(load) => load.call1((reference,)),
            None => unreachable!("set above"),
        }
    }

    /// Builds `node` for this connection.
    pub(crate) fn build(&mut self, node: &Node) -> PyResult<Bound<'py, PyAny>> {
        let py = self.py;
        let unsafe_share = UNSAFE_SHARE.load(Ordering::Relaxed);
        Ok(match node {
            Node::Leaf(o) => o.bind(py).clone(),
            Node::Ref(r) => self.resolve(r)?,
            Node::Global { module, name } => super::template::Globals::get(py)?
                .find_global
                .bind(py)
                .call1((module.bind(py), name.bind(py)))?,
            Node::Alias(slot) => match self.memo.get(*slot as usize) {
                Some(Some(o)) => o.bind(py).clone(),
                _ => {
                    return Err(pyo3::exceptions::PyRuntimeError::new_err(
                        "tidecache: a template's alias names no container (a bug: please report it)",
                    ))
                }
            },
            Node::List { slot, items, proto } => {
                let list = match proto {
                    Some(p) if unsafe_share => p.bind(py).clone(),
                    Some(p) => {
                        let p = p.bind(py);
                        p.get_slice(0, p.len())
                    }
                    None => {
                        let list = PyList::empty(py);
                        self.remember(*slot, list.as_any());
                        for item in items.iter() {
                            list.append(self.build(item)?)?;
                        }
                        list
                    }
                };
                self.remember(*slot, list.as_any());
                list.into_any()
            }
            Node::Dict { slot, items, proto } => {
                let dict = match proto {
                    Some(p) if unsafe_share => p.bind(py).clone(),
                    Some(p) => p.bind(py).copy()?,
                    None => {
                        let dict = PyDict::new(py);
                        self.remember(*slot, dict.as_any());
                        for (k, v) in items.iter() {
                            let k = self.build(k)?;
                            let v = self.build(v)?;
                            dict.set_item(k, v)?;
                        }
                        dict
                    }
                };
                self.remember(*slot, dict.as_any());
                dict.into_any()
            }
            Node::Tuple { slot, items } => {
                let mut built = Vec::with_capacity(items.len());
                for item in items.iter() {
                    built.push(self.build(item)?);
                }
                let t = PyTuple::new(py, built)?.into_any();
                self.remember(*slot, &t);
                t
            }
            Node::Set { slot, items, frozen } => {
                let mut built = Vec::with_capacity(items.len());
                for item in items.iter() {
                    built.push(self.build(item)?);
                }
                let s = if *frozen {
                    PyFrozenSet::new(py, built)?.into_any()
                } else {
                    PySet::new(py, built)?.into_any()
                };
                self.remember(*slot, &s);
                s
            }
            Node::ByteArray { slot, proto } => {
                let b = if unsafe_share {
                    proto.bind(py).clone().into_any()
                } else {
                    // SAFETY: the bytes are copied at once, under the GIL,
                    // and the template's bytearray is never handed out.
                    PyByteArray::new(py, unsafe { proto.bind(py).as_bytes() }).into_any()
                };
                self.remember(*slot, &b);
                b
            }
        })
    }

    /// The state handed to `__setstate__`: the template's own top-level
    /// dict (or `(dict, slots dict)` pair) when `persistent_default` (the
    /// class's `__setstate__` is `Persistent.__setstate__`, which copies
    /// it) and it holds only leaves; else a fresh build.
    pub(crate) fn state(&mut self, root: &Node, persistent_default: bool) -> PyResult<Bound<'py, PyAny>> {
        let py = self.py;
        if persistent_default {
            if let Node::Dict { proto: Some(p), .. } = root {
                return Ok(p.bind(py).clone().into_any());
            }
            if let Node::Tuple { items, .. } = root {
                if let [Node::Dict { proto: Some(d), .. }, second] = &items[..] {
                    let second = match second {
                        Node::Dict { proto: Some(s), .. } => s.bind(py).clone().into_any(),
                        Node::Leaf(l) => l.bind(py).clone(),
                        _ => return self.build(root),
                    };
                    return Ok(PyTuple::new(py, [d.bind(py).clone().into_any(), second])?.into_any());
                }
            }
        }
        self.build(root)
    }
}
