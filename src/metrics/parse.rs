//! A reader of the Prometheus text exposition format 0.0.4: what `kvh metrics` and
//! `kvh serve-metrics` check a metrics file with, and what the tests hold the encoder to.
//!
//! It enforces the rules a scraper relies on: metric and label names are well formed, label
//! values are escaped, values are numbers, a family has at most one `# HELP` and one
//! `# TYPE`, its `# TYPE` comes before its samples and names a known type, and a family's
//! samples are not split by another family's, and no series (name and label set, in any
//! label order) appears twice.

use std::collections::{HashMap, HashSet};

/// What separates a line's tokens in the text format: spaces and tabs only. Other whitespace
/// (a no-break space, a form feed) is part of a token there, and a scraper refuses the line,
/// so that a file read here with such a separator would be served to a scrape that fails.
pub(crate) const BLANKS: [char; 2] = [' ', '\t'];

/// One sample line.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    /// The label's value, if the sample has it.
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A parsed exposition.
#[derive(Clone, Debug, Default)]
pub struct Exposition {
    pub samples: Vec<Sample>,
    /// Family name → declared type.
    pub types: HashMap<String, String>,
    /// Family name → help text (unescaped).
    pub help: HashMap<String, String>,
}

impl Exposition {
    /// The value of the first sample `name` whose labels include every pair of `labels`.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.values(name, labels).next()
    }

    /// The values of every sample `name` whose labels include every pair of `labels` (one
    /// series per device, say), in file order.
    pub fn values<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = f64> + 'a {
        self.samples
            .iter()
            .filter(move |s| s.name == name && labels.iter().all(|(k, v)| s.label(k) == Some(*v)))
            .map(|s| s.value)
    }

    /// The first sample named `name`.
    pub fn sample(&self, name: &str) -> Option<&Sample> {
        self.samples.iter().find(|s| s.name == name)
    }
}

/// Where and why the text is not a valid exposition.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct ParseError {
    pub line: usize,
    /// What is wrong, quoting the names and values involved: for text kvhygiene made (its
    /// encoder's, a merge of checked snapshots).
    pub message: String,
    /// What is wrong without a word of the text: what a reader of a file someone named shows
    /// ([`ParseError::without_content`]), since the file may be a key named by mistake.
    pub reason: &'static str,
}

impl ParseError {
    /// `line N: REASON`, quoting nothing of the text.
    pub fn without_content(&self) -> String {
        format!("line {}: {}", self.line, self.reason)
    }
}

/// A line's fault: its content-free [`ParseError::reason`] and its quoting message.
struct Fault {
    reason: &'static str,
    message: String,
}

impl Fault {
    fn new(reason: &'static str, message: String) -> Fault {
        Fault { reason, message }
    }

    /// A fault whose message says no more than its reason.
    fn plain(reason: &'static str) -> Fault {
        Fault::new(reason, reason.to_string())
    }
}

/// The sample-name suffixes a family of type `kind` owns: a histogram's `_bucket`, `_sum`
/// and `_count`, a summary's `_sum` and `_count` (its quantiles carry the family's own name);
/// other types own none.
pub fn owned_suffixes(kind: &str) -> &'static [&'static str] {
    match kind {
        "histogram" => &["_bucket", "_sum", "_count"],
        "summary" => &["_sum", "_count"],
        _ => &[],
    }
}

/// The family a sample belongs to: `X` for a suffix ([`owned_suffixes`]) that a summary or
/// histogram `X` owns, else its own name.
pub fn family_of<'a>(name: &'a str, types: &HashMap<String, String>) -> &'a str {
    let owner = |(base, suffix): (&'a str, &str)| {
        types
            .get(base)
            .is_some_and(|kind| owned_suffixes(kind).contains(&suffix))
            .then_some(base)
    };
    ["_bucket", "_sum", "_count"]
        .into_iter()
        .filter_map(|suffix| name.strip_suffix(suffix).map(|base| (base, suffix)))
        .find_map(owner)
        .unwrap_or(name)
}

/// Parses `text`.
pub fn parse(text: &str) -> Result<Exposition, ParseError> {
    let mut out = Exposition::default();
    // Families whose samples have been seen, and the one being read.
    let mut finished: HashSet<String> = HashSet::new();
    let mut current: Option<String> = None;
    // Every series seen: name and sorted labels.
    let mut series: HashSet<(String, Vec<(String, String)>)> = HashSet::new();
    let lines = text.split('\n').count();
    for (i, line) in text.split('\n').enumerate() {
        let n = i + 1;
        let err = |fault: Fault| ParseError {
            line: n,
            message: fault.message,
            reason: fault.reason,
        };
        // The format's lines end with a line feed, the last one too: what a scraper refuses
        // (a file cut short inside a line, CRLF line ends) is not served.
        if line.contains('\r') {
            return Err(err(Fault::plain(
                "a carriage return: lines of the text format end with \\n only (CRLF?)",
            )));
        }
        if n == lines && !line.is_empty() {
            return Err(err(Fault::plain(
                "the last line has no line end (the file was cut short?)",
            )));
        }
        if line.trim_matches(BLANKS).is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            let mut words = comment.trim_start_matches(BLANKS).splitn(3, BLANKS);
            let keyword = words.next().unwrap_or("");
            if keyword != "HELP" && keyword != "TYPE" {
                continue; // An ordinary comment.
            }
            let name = words.next().unwrap_or("");
            if !valid_metric_name(name) {
                return Err(err(Fault::new(
                    "an invalid metric name in a # HELP or # TYPE line",
                    format!("# {keyword}: invalid metric name {name:?}"),
                )));
            }
            let rest = words.next().unwrap_or("").trim_start_matches(BLANKS);
            if keyword == "HELP" {
                let help = unescape_help(rest).map_err(|e| {
                    err(Fault::new(
                        "an invalid escape in a # HELP text",
                        format!("# HELP {name}: {e}"),
                    ))
                })?;
                if out.help.insert(name.into(), help).is_some() {
                    return Err(err(Fault::new(
                        "a second # HELP for one metric",
                        format!("second # HELP for {name}"),
                    )));
                }
            } else {
                let kind = rest.trim_end_matches(BLANKS);
                if !matches!(
                    kind,
                    "counter" | "gauge" | "histogram" | "summary" | "untyped"
                ) {
                    return Err(err(Fault::new(
                        "a # TYPE naming an unknown type",
                        format!("# TYPE {name}: unknown type {kind:?}"),
                    )));
                }
                if out.types.contains_key(name) {
                    return Err(err(Fault::new(
                        "a second # TYPE for one metric",
                        format!("second # TYPE for {name}"),
                    )));
                }
                if finished.contains(name) || current.as_deref() == Some(name) {
                    return Err(err(Fault::new(
                        "a # TYPE after its metric's samples",
                        format!("# TYPE for {name} after its samples"),
                    )));
                }
                out.types.insert(name.into(), kind.into());
            }
            continue;
        }
        let sample = parse_sample(line).map_err(err)?;
        let family = family_of(&sample.name, &out.types).to_string();
        let kind = out.types.get(&family).map(String::as_str);
        for (key, value) in &sample.labels {
            let numeric = (key == "le" && kind == Some("histogram"))
                || (key == "quantile" && kind == Some("summary"));
            if numeric && parse_value(value).is_none() {
                return Err(err(Fault::new(
                    "a histogram's le or a summary's quantile label that is not a number",
                    format!("{}: label {key} is not a number: {value:?}", sample.name),
                )));
            }
        }
        if current.as_deref() != Some(family.as_str()) {
            if finished.contains(&family) {
                return Err(err(Fault::new(
                    "a metric's samples split by another metric's",
                    format!("samples of {family} are split by another metric's"),
                )));
            }
            if let Some(prev) = current.take() {
                finished.insert(prev);
            }
            current = Some(family);
        }
        // A label with an empty value is no label to Prometheus: `m{a=""}` and `m` are one
        // series, of which a scrape keeps one sample.
        let mut labels: Vec<_> = sample
            .labels
            .iter()
            .filter(|(_, v)| !v.is_empty())
            .cloned()
            .collect();
        labels.sort();
        if !series.insert((sample.name.clone(), labels)) {
            return Err(err(Fault::new(
                "the same series twice",
                format!("{}: the same series twice", sample.name),
            )));
        }
        out.samples.push(sample);
    }
    Ok(out)
}

/// The metric name of a sample line (up to its labels or value).
pub fn sample_name(line: &str) -> &str {
    &line[..line.find(['{', ' ', '\t']).unwrap_or(line.len())]
}

fn parse_sample(line: &str) -> Result<Sample, Fault> {
    let name = sample_name(line);
    let name_end = name.len();
    if !valid_metric_name(name) {
        return Err(Fault::new(
            "an invalid metric name",
            format!("invalid metric name {name:?}"),
        ));
    }
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(after) = rest.strip_prefix('{') {
        let (parsed, remaining) = parse_labels(after)?;
        labels = parsed;
        rest = remaining;
    }
    let mut fields = rest.split(BLANKS).filter(|field| !field.is_empty());
    let value = fields
        .next()
        .ok_or_else(|| Fault::new("a sample without a value", format!("{name}: no value")))?;
    let value = parse_value(value).ok_or_else(|| {
        Fault::new(
            "an invalid value",
            format!("{name}: invalid value {value:?}"),
        )
    })?;
    if let Some(ts) = fields.next() {
        // Digits only: Prometheus' scrape refuses a sign that `i64::from_str` takes.
        let digits = ts.bytes().all(|b| b.is_ascii_digit());
        ts.parse::<i64>().ok().filter(|_| digits).ok_or_else(|| {
            Fault::new(
                "an invalid timestamp",
                format!("{name}: invalid timestamp {ts:?}"),
            )
        })?;
    }
    if let Some(extra) = fields.next() {
        return Err(Fault::new(
            "more after a sample's value and timestamp",
            format!("{name}: unexpected {extra:?} after the value"),
        ));
    }
    Ok(Sample {
        name: name.into(),
        labels,
        value,
    })
}

/// Parses `name="value",...}`; returns the labels and the text after the `}`.
type Labels<'a> = (Vec<(String, String)>, &'a str);

/// Most labels one sample may carry. kvhygiene's own series have at most three; the bound
/// keeps a planted line of a hundred thousand labels from costing minutes in the duplicate
/// check below (quadratic in the labels of one sample), where every reader of the file
/// (`kvh metrics`, `kvh gate`, each `serve-metrics` scrape) must answer within a probe's
/// timeout.
const MAX_LABELS: usize = 64;
/// [`MAX_LABELS`] as an error says it, without formatting (a [`Fault`]'s reason is static).
const TOO_MANY_LABELS: &str = "more than 64 labels";
const _: () = assert!(MAX_LABELS == 64, "TOO_MANY_LABELS names the bound");

fn parse_labels(mut s: &str) -> Result<Labels<'_>, Fault> {
    let mut labels: Vec<(String, String)> = Vec::new();
    loop {
        s = s.trim_start_matches(BLANKS);
        if let Some(after) = s.strip_prefix('}') {
            return Ok((labels, after));
        }
        let eq = s
            .find('=')
            .ok_or_else(|| Fault::plain("label without '='"))?;
        let key = s[..eq].trim_matches(BLANKS);
        if !valid_label_name(key) || key.starts_with("__") {
            // Names beginning with "__" are reserved to Prometheus.
            return Err(Fault::new(
                "an invalid label name",
                format!("invalid label name {key:?}"),
            ));
        }
        if labels.len() == MAX_LABELS {
            return Err(Fault::plain(TOO_MANY_LABELS));
        }
        if labels.iter().any(|(k, _)| k == key) {
            return Err(Fault::new(
                "a label given twice",
                format!("label {key} given twice"),
            ));
        }
        s = s[eq + 1..].trim_start_matches(BLANKS);
        s = s.strip_prefix('"').ok_or_else(|| {
            Fault::new(
                "a label value that is not quoted",
                format!("label {key}: value is not quoted"),
            )
        })?;
        let mut value = String::new();
        let mut chars = s.char_indices();
        let end = loop {
            match chars.next() {
                None => {
                    return Err(Fault::new(
                        "an unterminated label value",
                        format!("label {key}: unterminated value"),
                    ))
                }
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, '"')) => value.push('"'),
                    Some((_, 'n')) => value.push('\n'),
                    _ => {
                        return Err(Fault::new(
                            "an invalid escape in a label value",
                            format!("label {key}: invalid escape"),
                        ))
                    }
                },
                Some((_, c)) => value.push(c),
            }
        };
        labels.push((key.to_string(), value));
        s = s[end + 1..].trim_start_matches(BLANKS);
        if let Some(after) = s.strip_prefix(',') {
            s = after;
        } else if !s.starts_with('}') {
            return Err(Fault::new(
                "no ',' or '}' after a label value",
                format!("label {key}: expected ',' or '}}' after the value"),
            ));
        }
    }
}

fn parse_value(v: &str) -> Option<f64> {
    match v {
        "NaN" => Some(f64::NAN),
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        // Rust also reads "inf" and "nan", which the format does not allow.
        _ if v
            .chars()
            .any(|c| c.is_ascii_alphabetic() && c != 'e' && c != 'E') =>
        {
            None
        }
        // Rust reads a number beyond the float range as infinite; Prometheus (Go's
        // ParseFloat) refuses it: only the spellings above are infinite. One too small for
        // the float range (1e-400) reads as 0, which a number with a non-zero digit is not:
        // refused too, so that no count above zero is taken for none.
        _ => v
            .parse::<f64>()
            .ok()
            .filter(|x| x.is_finite())
            .filter(|&x| x != 0.0 || !has_nonzero_digit(v)),
    }
}

/// Whether the significand of the number `v` (before its exponent) has a digit other than 0.
fn has_nonzero_digit(v: &str) -> bool {
    v.split(['e', 'E'])
        .next()
        .is_some_and(|significand| significand.bytes().any(|b| (b'1'..=b'9').contains(&b)))
}

/// A `# HELP` text unescaped: the format allows `\\` and `\n` only there.
fn unescape_help(s: &str) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some('n') => out.push('\n'),
                Some('\\') => out.push('\\'),
                Some(other) => return Err(format!("invalid escape \\{other}")),
                None => return Err("a lone \\ at the end".into()),
            }
        } else {
            out.push(c);
        }
    }
    Ok(out)
}

/// `[a-zA-Z_:][a-zA-Z0-9_:]*`
pub fn valid_metric_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// `[a-zA-Z_][a-zA-Z0-9_]*`
fn valid_label_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A number too small for a float reads as 0 in Rust; a count that is not zero must not.
    #[test]
    fn a_value_below_the_float_range_is_refused_and_every_zero_is_zero() {
        for text in ["1e-400", "0.1e-330", "-5E-999"] {
            assert_eq!(parse_value(text), None, "{text}");
        }
        for zero in ["0", "-0", "+0", "0.0", "0e10", "0.000e-400"] {
            assert_eq!(parse_value(zero), Some(0.0), "{zero}");
        }
        assert!(
            parse_value("1e-310").is_some_and(|x| x > 0.0),
            "a subnormal is not zero"
        );
        assert!(parse("kvh_residue_detected_total 1e-400\n").is_err());
    }

    #[test]
    fn refuses_what_the_text_format_does_not_allow() {
        for (text, why) in [
            ("a 1", "no line end"),
            ("a 1\r\n", "carriage return"),
            ("# HELP a Tab\\there.\na 1\n", "invalid escape"),
            ("a{__name__=\"b\"} 1\n", "invalid label name"),
            ("# TYPE h histogram\nh_bucket{le=\"x\"} 1\n", "not a number"),
            ("# TYPE s summary\ns{quantile=\"half\"} 1\n", "not a number"),
        ] {
            let e = parse(text).unwrap_err();
            assert!(e.message.contains(why), "{text:?}: {e:?}");
        }
        assert!(parse("").is_ok() && parse("a 1\n\n").is_ok());
    }

    #[test]
    fn reads_samples_labels_and_escapes() {
        let text = "# HELP a_total Things.\\nMore.\n# TYPE a_total counter\na_total 3\n\
                    b{x=\"q\\\"uo\\\\te\\n\",y=\"2\",} 1.5e3 1700000000000\nc -Inf\n";
        let e = parse(text).unwrap();
        assert_eq!(e.value("a_total", &[]), Some(3.0));
        assert_eq!(e.help["a_total"], "Things.\nMore.");
        assert_eq!(e.types["a_total"], "counter");
        let b = e.sample("b").unwrap();
        assert_eq!(b.label("x"), Some("q\"uo\\te\n"));
        assert_eq!(b.value, 1500.0);
        assert_eq!(e.value("b", &[("y", "2")]), Some(1500.0));
        assert_eq!(e.value("b", &[("y", "3")]), None);
        assert_eq!(e.value("c", &[]), Some(f64::NEG_INFINITY));
    }

    #[test]
    fn refuses_what_a_scraper_would() {
        for (text, why) in [
            ("a b\n", "invalid value"),
            ("1a 1\n", "invalid metric name"),
            ("a{x=1} 1\n", "not quoted"),
            ("a{x=\"1} 1\n", "unterminated"),
            ("a{x=\"1\" 1\n", "expected ','"),
            ("a{x=\"1\",x=\"2\"} 1\n", "twice"),
            ("a 1 2 3\n", "unexpected"),
            ("a 1 soon\n", "timestamp"),
            ("a 1 -5\n", "timestamp"),
            ("a 1 +5\n", "timestamp"),
            ("a inf\n", "invalid value"),
            ("# TYPE a info\na 1\n", "unknown type"),
            ("# TYPE a gauge\n# TYPE a gauge\n", "second # TYPE"),
            ("# HELP a x\n# HELP a y\n", "second # HELP"),
            ("a 1\n# TYPE a gauge\n", "after its samples"),
            ("a 1\nb 1\na 2\n", "split"),
            ("a\n", "no value"),
            ("a 1\na 2\n", "same series twice"),
            (
                "a{x=\"1\",y=\"2\"} 1\na{y=\"2\",x=\"1\"} 2\n",
                "same series twice",
            ),
            // An empty label value is no label: one series, of which a scrape keeps one.
            ("a{x=\"\"} 1\na 2\n", "same series twice"),
            ("a{x=\"1\",y=\"\"} 1\na{x=\"1\"} 2\n", "same series twice"),
        ] {
            let e = parse(text).unwrap_err();
            assert!(e.message.contains(why), "{text:?}: {e}");
        }
        assert_eq!(parse("x 1\ny 2\nz\n").unwrap_err().line, 3);
        // Distinct label values are distinct series.
        assert_eq!(
            parse("a{x=\"1\"} 1\na{x=\"2\"} 1\na 3\n")
                .unwrap()
                .samples
                .len(),
            3
        );
    }

    /// Tokens are separated by spaces and tabs alone, as a scraper reads them: a no-break
    /// space or a form feed between a value and a timestamp leaves one token that is no
    /// number, where splitting at any whitespace read a timestamp the scrape would refuse.
    #[test]
    fn only_spaces_and_tabs_separate_tokens() {
        for text in [
            "a 1\u{a0}1700000000000\n",
            "a\u{a0}1\n",
            "a 1\x0c\n",
            "a{x=\"1\"}\x0b1\n",
            "a{\u{a0}x=\"1\"} 1\n",
            "\x0c\n",
        ] {
            assert!(parse(text).is_err(), "{text:?} was read");
        }
        let e = parse("a{ x = \"1\" ,\ty=\"2\"}\t2\t1700000000000 \n# TYPE b\tgauge\t\nb 1\n \t\n")
            .unwrap();
        assert_eq!(e.value("a", &[("x", "1"), ("y", "2")]), Some(2.0));
        assert_eq!(e.types["b"], "gauge");
    }

    /// A sample carrying a hundred thousand labels (a 1 MiB file, the largest `kvh metrics`,
    /// `kvh gate` and each `serve-metrics` scrape accept) is refused at its 65th label, not
    /// checked for duplicates label by label for minutes; 64 labels are read.
    #[test]
    fn a_sample_with_more_labels_than_any_series_needs_is_refused() {
        let sample = |n: usize| {
            let labels: Vec<String> = (0..n).map(|i| format!("l{i}=\"\"")).collect();
            format!("a{{{}}} 0\n", labels.join(","))
        };
        let max = parse(&sample(MAX_LABELS)).unwrap();
        assert_eq!(max.samples[0].labels.len(), MAX_LABELS);
        let err = parse(&sample(MAX_LABELS + 1)).unwrap_err().to_string();
        assert!(err.contains("more than 64 labels"), "{err}");
        let wide = sample(100_000);
        assert!(wide.len() < 1 << 20);
        assert!(parse(&wide).is_err());
    }

    #[test]
    fn summary_suffixes_belong_to_their_family() {
        let text = "# TYPE s summary\ns{quantile=\"0.5\"} 1\ns_sum 2\ns_count 3\n";
        assert_eq!(parse(text).unwrap().samples.len(), 3);
        // Without the summary type, `s_count` is another family and `s` cannot resume.
        assert!(parse("s 1\ns_count 3\ns 2\n").is_err());
    }
}
