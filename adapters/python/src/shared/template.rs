//! Templates: a record's state decoded once, its persistent references
//! kept symbolic, for every connection of the process to materialise from.
//!
//! A ZODB record is two pickles, the class's and the state's (ZODB's
//! `ObjectReader.getState` loads both and keeps the second). Decoding runs
//! ZODB's own unpickler (`ZODB._compat.PersistentUnpickler`, zodbpickle's C
//! unpickler) with two hooks of ours: `persistent_load` returns a
//! [`Reference`] marker instead of a ghost of some connection, and
//! `find_global` is ZODB's default class factory (`ZODB.broken.find_global`,
//! what `DB.classFactory` returns) watched for Broken classes. The decoded
//! tree is then classified, node by node:
//!
//! - **leaves**, immutable and shared by every activation: `str`, `bytes`,
//!   `int`, `float`, `complex`, `bool`, `None`, datetime values, `Decimal`,
//!   `UUID`, and tuples and frozensets made only of leaves;
//! - **globals** (classes, functions the record names), looked up with the
//!   class factory at every activation as ZODB's unpickling does;
//! - **containers**, copied at every activation: `list`, `dict`, `set`,
//!   `bytearray`, and tuples or frozensets holding containers or
//!   references; the same container twice in a state is one [`Node::Alias`]
//!   slot, so aliasing (and cycles through lists and dicts) survive;
//! - **references**, resolved per connection through its pickle cache.
//!
//! Anything else (an instance of any other class, built by a `__reduce__`)
//! makes the whole record a [`Template::Fallback`]: ZODB's normal path
//! activates it, from the pickle kept here, decoded once and never again.
//! The source of the idea is persistent issue #93 (sharing read-only
//! unpickled state between connections, keyed by oid and serial).

use pyo3::prelude::*;
use pyo3::sync::GILOnceCell;
use pyo3::types::{PyByteArray, PyBytes, PyDict, PyFrozenSet, PyList, PySet, PyString, PyTuple, PyType};
use std::collections::HashMap;
use tidecache_core::StateWeight;

/// Deepest nesting decoded; a deeper state falls back (ZODB's normal path
/// has Python's own recursion limit).
const MAX_DEPTH: usize = 200;

/// Why a record is activated by ZODB's normal path, counted per reason in
/// `tidecache.shared.stats(db)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Reason {
    /// The connection holds savepoint data (its storage is a `TmpStore`,
    /// whose serials are not unique).
    Savepoint,
    /// The state holds an object of a type not known to be immutable or
    /// copyable.
    UnknownType,
    /// The pickle could not be decoded here.
    DecodeError,
    /// The database has a class factory of its own.
    ClassFactory,
    /// The object's class is Broken, or the state names a missing class.
    Broken,
    /// The connection class has a `setstate` or an `ObjectReader` of its
    /// own.
    CustomConnection,
    /// The class pickle holds a persistent reference, or the object is
    /// itself a persistent class.
    PersistentClass,
}

impl Reason {
    /// Every reason, in the order of [`Reason::name`].
    pub(crate) const ALL: [Reason; 7] = [
        Reason::Savepoint,
        Reason::UnknownType,
        Reason::DecodeError,
        Reason::ClassFactory,
        Reason::Broken,
        Reason::CustomConnection,
        Reason::PersistentClass,
    ];

    /// The reason's name in the stats (`fallback_<name>`).
    pub(crate) fn name(self) -> &'static str {
        match self {
            Reason::Savepoint => "savepoint",
            Reason::UnknownType => "unknown_type",
            Reason::DecodeError => "decode_error",
            Reason::ClassFactory => "class_factory",
            Reason::Broken => "broken",
            Reason::CustomConnection => "custom_connection",
            Reason::PersistentClass => "persistent_class",
        }
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

/// A persistent reference as the record holds it: ZODB's forms are
/// `(oid, class)`, a bare `oid`, and the lists `['w', (oid,)]`,
/// `['w', (oid, database)]`, `['m', (database, oid, class)]`,
/// `['n', (database, oid)]`.
pub(crate) enum Ref {
    /// `(oid, class)` or a bare oid: the object is `cache.get(oid)` when
    /// the connection has it, else what ZODB's `ObjectReader` makes.
    Oid {
        /// The oid, 8 bytes.
        oid: Py<PyBytes>,
        /// The reference as unpickled (handed to `_persistent_load`).
        reference: PyObject,
    },
    /// Weak and cross-database references: always ZODB's `ObjectReader`.
    Other(PyObject),
}

/// One node of a decoded state.
pub(crate) enum Node {
    /// An immutable value, shared by every activation.
    Leaf(PyObject),
    /// A list; `proto` when every item is a leaf (copied with one slice).
    List {
        slot: u32,
        items: Box<[Node]>,
        proto: Option<Py<PyList>>,
    },
    /// A dict; `proto` when every key and value is a leaf (one
    /// `PyDict_Copy`).
    Dict {
        slot: u32,
        items: Box<[(Node, Node)]>,
        proto: Option<Py<PyDict>>,
    },
    /// A set, or a frozenset holding references.
    Set {
        slot: u32,
        items: Box<[Node]>,
        frozen: bool,
    },
    /// A tuple holding containers or references.
    Tuple { slot: u32, items: Box<[Node]> },
    /// A bytearray (copied).
    ByteArray { slot: u32, proto: Py<PyByteArray> },
    /// A persistent reference.
    Ref(Ref),
    /// A global (a class, a function) as the record names it: looked up
    /// with ZODB's class factory at every activation, as ZODB's unpickling
    /// does, so a class replaced or gone since the decoding is seen.
    Global { module: PyObject, name: PyObject },
    /// The container of `slot`, met again (aliasing, or a cycle).
    Alias(u32),
}

/// A decoded record.
pub(crate) enum Template {
    /// Materialised by [`crate::shared::materialise`].
    Shared {
        /// The state.
        root: Node,
        /// Container slots (the memo's size).
        slots: u32,
        /// Whether any [`Node::Alias`] exists (else no memo is kept).
        aliased: bool,
        /// Length of the record's pickle, bytes (`_p_estimated_size`).
        size: usize,
        /// Estimated bytes held (the size bound's weight).
        weight: usize,
    },
    /// Activated by ZODB's normal path from `pickle`.
    Fallback {
        /// The record.
        pickle: Py<PyBytes>,
        /// Why.
        reason: Reason,
    },
}

impl Template {
    /// Length of the record's pickle, bytes (`_p_estimated_size`).
    pub(crate) fn size(&self, py: Python<'_>) -> usize {
        match self {
            Template::Shared { size, .. } => *size,
            Template::Fallback { pickle, .. } => pickle.bind(py).as_bytes().len(),
        }
    }
}

impl StateWeight for Template {
    fn weight(&self) -> usize {
        match self {
            Template::Shared { weight, .. } => *weight,
            // The pickle's length, read without the GIL: a PyBytes' size
            // never changes, and `Py::as_ptr` needs no GIL.
            Template::Fallback { pickle, .. } => {
                // SAFETY: `pickle` is a live bytes object we hold a
                // reference to; its `ob_size` is immutable.
                let n = unsafe { pyo3::ffi::PyBytes_Size(pickle.as_ptr()) };
                usize::try_from(n).unwrap_or(0) + 64
            }
        }
    }
}

/// The marker our `persistent_load` returns for a reference.
#[pyclass(module = "tidecache._native", frozen)]
pub(crate) struct Reference {
    reference: PyObject,
}

/// Hooks of one decode: what `persistent_load` and `find_global` saw.
#[pyclass(module = "tidecache._native")]
pub(crate) struct DecodeHooks {
    /// References met so far.
    references: usize,
    /// A global resolved to a Broken class.
    broken: bool,
    /// `(module, name)` each global was found by, by the address of what
    /// was found (kept alive by the decoded state that holds it).
    names: HashMap<usize, (PyObject, PyObject)>,
}

#[pymethods]
impl DecodeHooks {
    /// `persistent_load`: a marker, resolved per connection later.
    fn persistent_load(&mut self, py: Python<'_>, reference: PyObject) -> PyResult<Py<Reference>> {
        self.references += 1;
        Py::new(py, Reference { reference })
    }

    /// `find_global`: ZODB's default class factory.
    fn find_global(
        &mut self,
        py: Python<'_>,
        module: &Bound<'_, PyAny>,
        name: &Bound<'_, PyAny>,
    ) -> PyResult<PyObject> {
        let globals = Globals::get(py)?;
        let found = globals.find_global.bind(py).call1((module, name))?;
        self.names.insert(
            found.as_ptr() as usize,
            (module.clone().unbind(), name.clone().unbind()),
        );
        if let Ok(t) = found.downcast::<PyType>() {
            if t.is_subclass(globals.broken.bind(py))? {
                self.broken = true;
            }
        }
        Ok(found.unbind())
    }
}

/// Python objects the decoder and the materialiser use, looked up once.
pub(crate) struct Globals {
    pub(crate) unpickler: PyObject,
    pub(crate) bytes_io: PyObject,
    pub(crate) find_global: PyObject,
    pub(crate) broken: PyObject,
    pub(crate) blob: PyObject,
    pub(crate) persistent_setstate: PyObject,
    /// Exact types shared as leaves besides the builtin ones.
    pub(crate) leaf_types: Vec<PyObject>,
    pub(crate) function_types: Vec<PyObject>,
}

static GLOBALS: GILOnceCell<Globals> = GILOnceCell::new();

impl Globals {
    pub(crate) fn get(py: Python<'_>) -> PyResult<&'static Globals> {
        GLOBALS.get_or_try_init(py, || {
            let attr = |m: &str, n: &str| -> PyResult<PyObject> { Ok(py.import(m)?.getattr(n)?.unbind()) };
            let mut leaf_types = Vec::new();
            for (m, n) in [
                ("datetime", "date"),
                ("datetime", "datetime"),
                ("datetime", "time"),
                ("datetime", "timedelta"),
                ("datetime", "timezone"),
                ("decimal", "Decimal"),
                ("uuid", "UUID"),
            ] {
                leaf_types.push(attr(m, n)?);
            }
            let function_types = vec![attr("types", "FunctionType")?, attr("types", "BuiltinFunctionType")?];
            Ok(Globals {
                unpickler: attr("ZODB._compat", "PersistentUnpickler")?,
                bytes_io: attr("io", "BytesIO")?,
                find_global: attr("ZODB.broken", "find_global")?,
                broken: attr("ZODB.broken", "Broken")?,
                blob: attr("ZODB.blob", "Blob")?,
                persistent_setstate: py
                    .import("persistent")?
                    .getattr("Persistent")?
                    .getattr("__setstate__")?
                    .unbind(),
                leaf_types,
                function_types,
            })
        })
    }
}

/// Decodes the record `pickle` into a template. Never fails: what cannot be
/// shared becomes a [`Template::Fallback`] with its reason.
pub(crate) fn decode(py: Python<'_>, pickle: &Bound<'_, PyBytes>) -> Template {
    let fallback = |reason| Template::Fallback {
        pickle: pickle.clone().unbind(),
        reason,
    };
    type Names = HashMap<usize, (PyObject, PyObject)>;
    let decoded = (|| -> PyResult<Result<(Bound<'_, PyAny>, Names), Reason>> {
        let g = Globals::get(py)?;
        let hooks = Bound::new(
            py,
            DecodeHooks {
                references: 0,
                broken: false,
                names: HashMap::new(),
            },
        )?;
        let file = g.bytes_io.bind(py).call1((pickle,))?;
        let unpickler =
            g.unpickler
                .bind(py)
                .call1((hooks.getattr("find_global")?, hooks.getattr("persistent_load")?, file))?;
        unpickler.call_method0("load")?; // the class pickle
        if hooks.borrow().references > 0 {
            return Ok(Err(Reason::PersistentClass));
        }
        let state = unpickler.call_method0("load")?;
        if hooks.borrow().broken {
            return Ok(Err(Reason::Broken));
        }
        let names = std::mem::take(&mut hooks.borrow_mut().names);
        Ok(Ok((state, names)))
    })();
    let (state, names) = match decoded {
        Ok(Ok(decoded)) => decoded,
        Ok(Err(reason)) => return fallback(reason),
        Err(_) => return fallback(Reason::DecodeError),
    };
    let mut b = Builder {
        py,
        names,
        seen: HashMap::new(),
        building_tuples: Vec::new(),
        leaf_tuples: HashMap::new(),
        slots: 0,
        aliased: false,
        weight: 0,
    };
    match b.node(&state, 0) {
        Ok(root) => Template::Shared {
            root,
            slots: b.slots,
            aliased: b.aliased,
            size: pickle.as_bytes().len(),
            weight: b.weight + std::mem::size_of::<Template>(),
        },
        Err(reason) => fallback(reason),
    }
}

/// Classifies a decoded tree.
struct Builder<'py> {
    py: Python<'py>,
    /// `(module, name)` of the globals the unpickler found.
    names: HashMap<usize, (PyObject, PyObject)>,
    /// Containers met, by address: their slot.
    seen: HashMap<usize, u32>,
    /// Tuples being built (a tuple met inside itself cannot be rebuilt).
    building_tuples: Vec<usize>,
    /// Whether each tuple or frozenset met is a leaf, by address: a state
    /// that shares sub-tuples (a DAG) is classified in linear time.
    leaf_tuples: HashMap<usize, bool>,
    slots: u32,
    aliased: bool,
    weight: usize,
}

impl<'py> Builder<'py> {
    fn slot(&mut self, obj: &Bound<'py, PyAny>) -> u32 {
        let s = self.slots;
        self.slots += 1;
        self.seen.insert(obj.as_ptr() as usize, s);
        s
    }

    /// Whether `obj` is an immutable value shared as is (tuples and
    /// frozensets only when all their items are).
    fn is_leaf(&mut self, obj: &Bound<'py, PyAny>, depth: usize) -> Result<bool, Reason> {
        if depth > MAX_DEPTH {
            return Err(Reason::UnknownType);
        }
        let py = self.py;
        if obj.is_none()
            || obj.is_exact_instance_of::<PyString>()
            || obj.is_exact_instance_of::<PyBytes>()
            || obj.is_exact_instance_of::<pyo3::types::PyInt>()
            || obj.is_exact_instance_of::<pyo3::types::PyFloat>()
            || obj.is_exact_instance_of::<pyo3::types::PyBool>()
            || obj.is_exact_instance_of::<pyo3::types::PyComplex>()
        {
            self.weight += leaf_weight(obj);
            return Ok(true);
        }
        let tuple = obj.downcast_exact::<PyTuple>().ok();
        let frozen = obj.downcast_exact::<PyFrozenSet>().ok();
        if tuple.is_some() || frozen.is_some() {
            let addr = obj.as_ptr() as usize;
            if let Some(&known) = self.leaf_tuples.get(&addr) {
                return Ok(known);
            }
            let mut leaf = true;
            if let Some(t) = tuple {
                for item in t.iter() {
                    if !self.is_leaf(&item, depth + 1)? {
                        leaf = false;
                        break;
                    }
                }
                self.weight += 40 + 8 * t.len();
            } else if let Some(f) = frozen {
                for item in f.iter() {
                    if !self.is_leaf(&item, depth + 1)? {
                        leaf = false;
                        break;
                    }
                }
                self.weight += 200 + 16 * f.len();
            }
            self.leaf_tuples.insert(addr, leaf);
            return Ok(leaf);
        }
        if self.names.contains_key(&(obj.as_ptr() as usize)) {
            return Ok(false); // a global: `Node::Global`, looked up again each time
        }
        if obj.is_instance_of::<PyType>() {
            return Ok(true); // a type not named by the record (a builtin's)
        }
        let Ok(g) = Globals::get(py) else {
            return Err(Reason::DecodeError);
        };
        let ty = obj.get_type();
        if g.function_types.iter().any(|t| ty.is(t.bind(py))) {
            // A function, or a builtin bound to a module; a builtin method
            // bound to an object (`some_list.append`) shares that object.
            return Ok(match obj.getattr("__self__") {
                Ok(owner) => owner.is_none() || owner.is_instance_of::<pyo3::types::PyModule>(),
                Err(_) => true,
            });
        }
        if g.leaf_types.iter().any(|t| ty.is(t.bind(py))) {
            self.weight += 48;
            return Ok(true);
        }
        Ok(false)
    }

    fn node(&mut self, obj: &Bound<'py, PyAny>, depth: usize) -> Result<Node, Reason> {
        if depth > MAX_DEPTH {
            return Err(Reason::UnknownType);
        }
        self.weight += std::mem::size_of::<Node>();
        if let Some(&slot) = self.seen.get(&(obj.as_ptr() as usize)) {
            if self.building_tuples.contains(&(obj.as_ptr() as usize)) {
                return Err(Reason::UnknownType);
            }
            self.aliased = true;
            return Ok(Node::Alias(slot));
        }
        if let Some((module, name)) = self.names.get(&(obj.as_ptr() as usize)) {
            return Ok(Node::Global {
                module: module.clone_ref(self.py),
                name: name.clone_ref(self.py),
            });
        }
        if self.is_leaf(obj, depth)? {
            return Ok(Node::Leaf(obj.clone().unbind()));
        }
        if let Ok(r) = obj.downcast_exact::<Reference>() {
            return Ok(Node::Ref(reference(
                self.py,
                r.get().reference.bind(self.py),
                &self.names,
            )));
        }
        if let Ok(l) = obj.downcast_exact::<PyList>() {
            let slot = self.slot(obj);
            let mut items = Vec::with_capacity(l.len());
            let mut all_leaves = true;
            for item in l.iter() {
                let n = self.node(&item, depth + 1)?;
                all_leaves &= matches!(n, Node::Leaf(_));
                items.push(n);
            }
            self.weight += 56 + 8 * l.len();
            if all_leaves {
                // Copied from the prototype: the nodes are not kept.
                self.weight -= items.len() * std::mem::size_of::<Node>();
                items.clear();
            }
            return Ok(Node::List {
                slot,
                items: items.into_boxed_slice(),
                proto: all_leaves.then(|| l.clone().unbind()),
            });
        }
        if let Ok(d) = obj.downcast_exact::<PyDict>() {
            let slot = self.slot(obj);
            let mut items = Vec::with_capacity(d.len());
            let mut all_leaves = true;
            for (k, v) in d.iter() {
                let kn = self.node(&k, depth + 1)?;
                let vn = self.node(&v, depth + 1)?;
                all_leaves &= matches!(kn, Node::Leaf(_)) && matches!(vn, Node::Leaf(_));
                items.push((kn, vn));
            }
            self.weight += 64 + 40 * d.len();
            if all_leaves {
                self.weight -= 2 * items.len() * std::mem::size_of::<Node>();
                items.clear();
            }
            return Ok(Node::Dict {
                slot,
                items: items.into_boxed_slice(),
                proto: all_leaves.then(|| d.clone().unbind()),
            });
        }
        if let Ok(t) = obj.downcast_exact::<PyTuple>() {
            let slot = self.slot(obj);
            let addr = obj.as_ptr() as usize;
            self.building_tuples.push(addr);
            let items: Result<Vec<Node>, Reason> = t.iter().map(|i| self.node(&i, depth + 1)).collect();
            self.building_tuples.pop();
            self.weight += 40 + 8 * t.len();
            return Ok(Node::Tuple {
                slot,
                items: items?.into_boxed_slice(),
            });
        }
        let frozen = obj.is_exact_instance_of::<PyFrozenSet>();
        if frozen || obj.is_exact_instance_of::<PySet>() {
            let slot = self.slot(obj);
            let addr = obj.as_ptr() as usize;
            self.building_tuples.push(addr);
            let mut items = Vec::new();
            let iter = obj.try_iter().map_err(|_| Reason::DecodeError)?;
            for item in iter {
                let item = item.map_err(|_| Reason::DecodeError)?;
                match self.node(&item, depth + 1) {
                    Ok(n) => items.push(n),
                    Err(e) => {
                        self.building_tuples.pop();
                        return Err(e);
                    }
                }
            }
            self.building_tuples.pop();
            self.weight += 200 + 16 * items.len();
            return Ok(Node::Set {
                slot,
                items: items.into_boxed_slice(),
                frozen,
            });
        }
        if let Ok(b) = obj.downcast_exact::<PyByteArray>() {
            let slot = self.slot(obj);
            self.weight += 57 + b.len();
            return Ok(Node::ByteArray {
                slot,
                proto: b.clone().unbind(),
            });
        }
        Err(Reason::UnknownType)
    }
}

/// Approximate bytes of a leaf (CPython's object sizes).
fn leaf_weight(obj: &Bound<'_, PyAny>) -> usize {
    if let Ok(s) = obj.downcast_exact::<PyString>() {
        return 49 + s.to_str().map(str::len).unwrap_or(0);
    }
    if let Ok(b) = obj.downcast_exact::<PyBytes>() {
        return 33 + b.as_bytes().len();
    }
    28
}

/// The [`Ref`] of a reference as ZODB's `ObjectReader._persistent_load`
/// reads it. The class of an `(oid, class)` reference is kept as the
/// `(module, name)` the record named it by, so that each ghost made from it
/// gets its class from the connection's class factory then, as ZODB's own
/// unpickling would (a class that became Broken since the template was
/// decoded gives a Broken ghost, not the old class).
fn reference(py: Python<'_>, r: &Bound<'_, PyAny>, names: &HashMap<usize, (PyObject, PyObject)>) -> Ref {
    let oid_of = |o: &Bound<'_, PyAny>| -> Option<Py<PyBytes>> {
        if let Ok(b) = o.downcast_exact::<PyBytes>() {
            return Some(b.clone().unbind());
        }
        // ZODB: "this happens when all bytes in the oid are < 0x80".
        let s = o.downcast_exact::<PyString>().ok()?;
        let text = s.to_str().ok()?;
        text.is_ascii().then(|| PyBytes::new(py, text.as_bytes()).unbind())
    };
    if let Ok(t) = r.downcast_exact::<PyTuple>() {
        if t.len() == 2 {
            if let Some(oid) = t.get_item(0).ok().as_ref().and_then(oid_of) {
                let symbolic = t.get_item(1).ok().and_then(|klass| {
                    let (module, name) = names.get(&(klass.as_ptr() as usize))?;
                    let pair = PyTuple::new(py, [module.bind(py), name.bind(py)]).ok()?;
                    PyTuple::new(py, [t.get_item(0).ok()?, pair.into_any()]).ok()
                });
                return Ref::Oid {
                    oid,
                    reference: symbolic.map_or_else(|| r.clone().unbind(), |s| s.into_any().unbind()),
                };
            }
        }
    } else if let Some(oid) = oid_of(r) {
        return Ref::Oid {
            oid,
            reference: r.clone().unbind(),
        };
    }
    Ref::Other(r.clone().unbind())
}
