//! Tenant / request / model ids attached to the calling thread and stamped on blocks and events.
//!
//! Ids are validated once, where they enter (`kvh_set_context`): at most [`MAX_ID_LEN`] bytes of
//! UTF-8 with no control characters, so an id can never forge a log line or a JSON field.

use std::cell::RefCell;
use std::fmt;
use std::sync::Arc;

/// Longest accepted id, in bytes.
pub const MAX_ID_LEN: usize = 128;

/// Why an id was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ContextError {
    #[error("{field} is {len} bytes long; at most {MAX_ID_LEN} bytes are accepted")]
    TooLong { field: &'static str, len: usize },
    /// An id read through a bounded C string: longer than the limit, its length not read.
    #[error("{field} is over {MAX_ID_LEN} bytes long; at most {MAX_ID_LEN} bytes are accepted")]
    Overlong { field: &'static str },
    #[error(
        "{field} contains {} at byte {at}; ids must be printable text",
        unprintable_name(*found)
    )]
    ControlCharacter {
        field: &'static str,
        at: usize,
        found: char,
    },
    #[error("{field} is not valid UTF-8")]
    NotUtf8 { field: &'static str },
}

/// The ids of one request. Cheap to clone (one `Arc`).
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct Context {
    ids: Option<Arc<ContextIds>>,
    /// Hash of the tenant id (0 when absent), computed once so the pool can key its free lists
    /// by tenant without hashing strings on every allocation. The pool still compares the ids
    /// themselves before handing a block across, so a hash collision cannot cross tenants.
    tenant_key: u64,
}

/// The three ids; each is optional.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct ContextIds {
    pub tenant_id: Option<String>,
    pub request_id: Option<String>,
    pub model_id: Option<String>,
}

impl Context {
    /// The empty context (no ids).
    pub const fn none() -> Self {
        Context {
            ids: None,
            tenant_key: 0,
        }
    }

    /// Validates and builds a context from raw ids.
    pub fn new(
        tenant_id: Option<&str>,
        request_id: Option<&str>,
        model_id: Option<&str>,
    ) -> Result<Self, ContextError> {
        let ids = ContextIds {
            tenant_id: validate_id("tenant_id", tenant_id)?,
            request_id: validate_id("request_id", request_id)?,
            model_id: validate_id("model_id", model_id)?,
        };
        if ids == ContextIds::default() {
            return Ok(Context::none());
        }
        let tenant_key = ids.tenant_id.as_deref().map_or(0, tenant_hash);
        Ok(Context {
            ids: Some(Arc::new(ids)),
            tenant_key,
        })
    }

    /// Builds a context from raw bytes (the C boundary), checking UTF-8 as well.
    pub fn from_bytes(
        tenant_id: Option<&[u8]>,
        request_id: Option<&[u8]>,
        model_id: Option<&[u8]>,
    ) -> Result<Self, ContextError> {
        Context::new(
            utf8_id("tenant_id", tenant_id)?,
            utf8_id("request_id", request_id)?,
            utf8_id("model_id", model_id)?,
        )
    }

    pub fn tenant_id(&self) -> Option<&str> {
        self.ids.as_ref().and_then(|c| c.tenant_id.as_deref())
    }

    pub fn request_id(&self) -> Option<&str> {
        self.ids.as_ref().and_then(|c| c.request_id.as_deref())
    }

    pub fn model_id(&self) -> Option<&str> {
        self.ids.as_ref().and_then(|c| c.model_id.as_deref())
    }

    /// Hash of the tenant id (0 for no tenant); see the field's comment.
    pub fn tenant_key(&self) -> u64 {
        self.tenant_key
    }

    /// Sets this thread's context; returns the previous one. At thread exit, once the
    /// thread's context is destroyed (a call from another thread-local's destructor), sets
    /// nothing and returns none.
    pub fn set_current(ctx: Context) -> Context {
        Context::try_set_current(ctx).unwrap_or_else(Context::none)
    }

    /// [`Context::set_current`] that says whether it could: `None` at thread exit, once the
    /// thread's context is destroyed, when nothing is set (what the thread allocates from
    /// then on carries no context).
    pub fn try_set_current(ctx: Context) -> Option<Context> {
        CURRENT.try_with(|c| c.replace(ctx)).ok()
    }

    /// This thread's context; none at thread exit once it is destroyed (see
    /// [`Context::set_current`]).
    pub fn current() -> Context {
        CURRENT
            .try_with(|c| c.borrow().clone())
            .unwrap_or_else(|_| Context::none())
    }
}

impl fmt::Debug for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Context")
            .field("tenant_id", &self.tenant_id())
            .field("request_id", &self.request_id())
            .field("model_id", &self.model_id())
            .finish()
    }
}

thread_local! {
    static CURRENT: RefCell<Context> = const { RefCell::new(Context::none()) };
}

fn tenant_hash(tenant: &str) -> u64 {
    use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
    // Never 0, which stands for "no tenant".
    BuildHasherDefault::<DefaultHasher>::default()
        .hash_one(tenant)
        .max(1)
}

/// An id given as bytes (from C, read up to one byte past the limit): checked for length
/// first, since the bounded read may have cut a multi-byte character of an over-long id.
fn utf8_id<'a>(field: &'static str, b: Option<&'a [u8]>) -> Result<Option<&'a str>, ContextError> {
    b.map(|b| {
        if b.len() > MAX_ID_LEN {
            return Err(ContextError::Overlong { field });
        }
        std::str::from_utf8(b).map_err(|_| ContextError::NotUtf8 { field })
    })
    .transpose()
}

fn validate_id(field: &'static str, id: Option<&str>) -> Result<Option<String>, ContextError> {
    let Some(id) = id else { return Ok(None) };
    if id.len() > MAX_ID_LEN {
        return Err(ContextError::TooLong {
            field,
            len: id.len(),
        });
    }
    if let Some((at, found)) = id.char_indices().find(|&(_, c)| unprintable(c)) {
        return Err(ContextError::ControlCharacter { field, at, found });
    }
    if id.is_empty() {
        return Ok(None);
    }
    Ok(Some(id.to_owned()))
}

/// Characters an id may not hold: control characters (a line break would forge a line of a
/// report), and the invisible ones that change how text around them is shown (Unicode's
/// format characters, category Cf: bidirectional marks, overrides and isolates, zero-width
/// characters, tag characters, the soft hyphen; and the line and paragraph separators): an id
/// that holds one can display as another tenant's in a report or a terminal.
pub(crate) fn unprintable(c: char) -> bool {
    c.is_control() || INVISIBLE.iter().any(|&(lo, hi)| (lo..=hi).contains(&c))
}

/// Unicode 15.1's format characters (general category Cf), its line and paragraph
/// separators (Zl, Zp: U+2028, U+2029) and the rest of its default-ignorable code points
/// (rendered as nothing: the combining grapheme joiner, Hangul fillers, variation
/// selectors, the tag and reserved ranges), as ranges. Written out because the standard library
/// has no general category; python/kvhygiene/vllm.py holds the same table (its ids must be
/// ones this accepts), and python/tests/test_vllm.py checks the two agree.
const INVISIBLE: &[(char, char)] = &[
    ('\u{00AD}', '\u{00AD}'),
    ('\u{034F}', '\u{034F}'),
    ('\u{0600}', '\u{0605}'),
    ('\u{061C}', '\u{061C}'),
    ('\u{06DD}', '\u{06DD}'),
    ('\u{070F}', '\u{070F}'),
    ('\u{0890}', '\u{0891}'),
    ('\u{08E2}', '\u{08E2}'),
    ('\u{115F}', '\u{1160}'),
    ('\u{17B4}', '\u{17B5}'),
    ('\u{180B}', '\u{180F}'),
    ('\u{200B}', '\u{200F}'),
    ('\u{2028}', '\u{202E}'),
    ('\u{2060}', '\u{206F}'),
    ('\u{3164}', '\u{3164}'),
    ('\u{FE00}', '\u{FE0F}'),
    ('\u{FEFF}', '\u{FEFF}'),
    ('\u{FFA0}', '\u{FFA0}'),
    ('\u{FFF0}', '\u{FFFB}'),
    ('\u{110BD}', '\u{110BD}'),
    ('\u{110CD}', '\u{110CD}'),
    ('\u{13430}', '\u{1343F}'),
    ('\u{1BCA0}', '\u{1BCA3}'),
    ('\u{1D173}', '\u{1D17A}'),
    ('\u{E0000}', '\u{E0FFF}'),
];

fn unprintable_name(c: char) -> String {
    let kind = if c.is_control() {
        "a control character"
    } else {
        "an invisible formatting character"
    };
    format!("{kind} (U+{:04X})", u32::from(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_printable_ids_and_treats_empty_as_absent() {
        let c = Context::new(Some("tenant-a"), Some(""), None).unwrap();
        assert_eq!(c.tenant_id(), Some("tenant-a"));
        assert_eq!(c.request_id(), None);
        assert_eq!(Context::new(None, Some(""), None).unwrap(), Context::none());
    }

    #[test]
    fn refuses_long_ids() {
        let long = "x".repeat(MAX_ID_LEN + 1);
        let err = Context::new(Some(&long), None, None).unwrap_err();
        assert_eq!(
            err,
            ContextError::TooLong {
                field: "tenant_id",
                len: 129
            }
        );
        assert!(Context::new(Some(&"x".repeat(MAX_ID_LEN)), None, None).is_ok());
    }

    #[test]
    fn refuses_control_characters() {
        let err = Context::new(None, Some("req\n{\"kind\":\"forged\"}"), None).unwrap_err();
        assert_eq!(
            err,
            ContextError::ControlCharacter {
                field: "request_id",
                at: 3,
                found: '\n',
            }
        );
        assert!(Context::new(None, None, Some("m\u{7f}")).is_err());
    }

    #[test]
    fn refuses_invisible_formatting_characters() {
        // A right-to-left override makes "tenant-\u{202E}b-tnaga" display as "tenant-agant-b".
        for id in [
            "tenant-\u{202E}b-tnaga",
            "tenant\u{2028}b",
            "tenant\u{2029}b",
            "ten\u{200B}ant",
            "\u{2066}tenant\u{2069}",
            "\u{FEFF}tenant",
        ] {
            let err = Context::new(Some(id), None, None).unwrap_err();
            assert!(
                matches!(
                    err,
                    ContextError::ControlCharacter {
                        field: "tenant_id",
                        ..
                    }
                ),
                "{id:?}: {err:?}"
            );
        }
        let err = Context::new(None, Some("a\u{202E}b"), None).unwrap_err();
        assert_eq!(
            err.to_string(),
            "request_id contains an invisible formatting character (U+202E) at byte 1; ids \
             must be printable text"
        );
        // Printable text beyond ASCII stays accepted.
        assert!(Context::new(Some("mandant-münchen-東京"), Some("r-ü"), Some("ℓ-7b")).is_ok());
    }

    #[test]
    fn refuses_other_invisible_format_characters() {
        // Each of these ids displays as "tenant-a" (the added character is an invisible format
        // character: a tag character, a soft hyphen, the Arabic letter mark, a bidirectional
        // mark as U+200E / U+200F are, the Mongolian vowel separator), so it could pass for
        // tenant-a's in a report: refused as the other invisible formatting characters are.
        for id in [
            "tenant-a\u{E0041}",
            "tenant-a\u{E0001}",
            "tenant\u{00AD}-a",
            "tenant-a\u{061C}",
            "tenant\u{180E}-a",
        ] {
            let err = Context::new(Some(id), None, None);
            assert!(
                matches!(err, Err(ContextError::ControlCharacter { .. })),
                "{id:?} (displays as \"tenant-a\") was accepted: {err:?}"
            );
        }
    }

    #[test]
    fn refuses_default_ignorable_characters_that_display_as_another_id() {
        // Each of these ids displays as "tenant-a": the added character is one Unicode marks
        // Default_Ignorable_Code_Point (rendered as nothing: a combining grapheme joiner,
        // Hangul fillers, an inherent Khmer vowel, a Mongolian free variation selector,
        // variation selectors), so it could pass for tenant-a's in a report, as the format
        // characters refused above could.
        for id in [
            "tenant-a\u{034F}",
            "tenant\u{115F}-a",
            "tenant-a\u{17B4}",
            "tenant-a\u{180B}",
            "tenant-a\u{3164}",
            "tenant-a\u{FE0F}",
            "tenant-a\u{FFA0}",
            "tenant-a\u{E0100}",
        ] {
            let err = Context::new(Some(id), None, None);
            assert!(
                matches!(err, Err(ContextError::ControlCharacter { .. })),
                "{id:?} (displays as \"tenant-a\") was accepted: {err:?}"
            );
        }
    }

    #[test]
    fn refuses_invalid_utf8() {
        let err = Context::from_bytes(None, None, Some(&[0xff, 0xfe])).unwrap_err();
        assert_eq!(err, ContextError::NotUtf8 { field: "model_id" });
    }

    #[test]
    fn context_is_per_thread() {
        let ctx = Context::new(Some("t1"), None, None).unwrap();
        Context::set_current(ctx.clone());
        let other = std::thread::spawn(Context::current).join().unwrap();
        assert_eq!(other, Context::none());
        assert_eq!(Context::current(), ctx);
        Context::set_current(Context::none());
    }
}
