//! Diagnostics a person reads: Cedar's own (or ours) with the file name attached, rendered
//! by miette with the source snippet, `file:line:column` and help.

use std::fmt;

use miette::{
    Diagnostic, GraphicalReportHandler, GraphicalTheme, LabeledSpan, NamedSource, SourceSpan,
};
use serde::Serialize;

/// One problem in a policy set, located in a file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PolicyDiagnostic {
    /// The file, as the user named it (directory joined with the file name).
    pub file: String,
    /// 1-based line of the first labelled span, when there is one.
    pub line: Option<usize>,
    /// 1-based column (in characters) of the first labelled span.
    pub column: Option<usize>,
    /// The error message.
    pub message: String,
    /// Cedar's (or our) hint, when there is one.
    pub help: Option<String>,
    /// The full rendering: message, `[file:line:column]`, source snippet, help.
    pub rendered: String,
}

impl fmt::Display for PolicyDiagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.rendered.trim_end())
    }
}

impl PolicyDiagnostic {
    /// Renders a diagnostic whose spans point into `text`, naming the file `file`.
    pub(crate) fn from_diagnostic(inner: &dyn Diagnostic, file: &str, text: &str) -> Self {
        let source = NamedSource::new(file, text.to_owned());
        let named = Named {
            inner,
            source: &source,
        };
        let mut rendered = String::new();
        let handler =
            GraphicalReportHandler::new_themed(GraphicalTheme::unicode_nocolor()).with_width(120);
        if handler.render_report(&mut rendered, &named).is_err() {
            rendered = inner.to_string();
        }
        let offset = inner
            .labels()
            .and_then(|mut l| l.next())
            .map(|l| l.offset());
        let (line, column) = match offset {
            Some(off) => {
                let (l, c) = line_col(text, off);
                (Some(l), Some(c))
            }
            None => (None, None),
        };
        Self {
            file: file.to_owned(),
            line,
            column,
            message: inner.to_string(),
            help: inner.help().map(|h| h.to_string()),
            rendered,
        }
    }

    /// Our own diagnostic: `message` at `span` of `text`, with an optional hint.
    pub(crate) fn at(
        file: &str,
        text: &str,
        span: Option<(usize, usize)>,
        message: String,
        help: Option<String>,
    ) -> Self {
        let own = Own {
            message,
            help,
            span: span.map(|(o, l)| SourceSpan::new(o.into(), l)),
        };
        Self::from_diagnostic(&own, file, text)
    }
}

/// 1-based line and column (in characters) of a byte offset.
pub(crate) fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

/// A diagnostic whose source code is replaced by a named one.
struct Named<'a> {
    inner: &'a dyn Diagnostic,
    source: &'a NamedSource<String>,
}

impl fmt::Debug for Named<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.inner, f)
    }
}

impl fmt::Display for Named<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self.inner, f)
    }
}

impl std::error::Error for Named<'_> {}

impl Diagnostic for Named<'_> {
    fn code<'b>(&'b self) -> Option<Box<dyn fmt::Display + 'b>> {
        self.inner.code()
    }
    fn severity(&self) -> Option<miette::Severity> {
        self.inner.severity()
    }
    fn help<'b>(&'b self) -> Option<Box<dyn fmt::Display + 'b>> {
        self.inner.help()
    }
    fn url<'b>(&'b self) -> Option<Box<dyn fmt::Display + 'b>> {
        self.inner.url()
    }
    fn source_code(&self) -> Option<&dyn miette::SourceCode> {
        Some(self.source)
    }
    fn labels(&self) -> Option<Box<dyn Iterator<Item = LabeledSpan> + '_>> {
        self.inner.labels()
    }
    fn related<'b>(&'b self) -> Option<Box<dyn Iterator<Item = &'b dyn Diagnostic> + 'b>> {
        self.inner.related()
    }
}

/// A diagnostic of ours (annotations, links, duplicate ids).
#[derive(Debug)]
struct Own {
    message: String,
    help: Option<String>,
    span: Option<SourceSpan>,
}

impl fmt::Display for Own {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Own {}

impl Diagnostic for Own {
    fn help<'b>(&'b self) -> Option<Box<dyn fmt::Display + 'b>> {
        self.help
            .as_ref()
            .map(|h| Box::new(h) as Box<dyn fmt::Display>)
    }
    fn labels(&self) -> Option<Box<dyn Iterator<Item = LabeledSpan> + '_>> {
        self.span.map(|s| {
            Box::new(std::iter::once(LabeledSpan::underline(s)))
                as Box<dyn Iterator<Item = LabeledSpan>>
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_diagnostics_name_file_line_and_column() {
        let text = "permit(\n  principal,\n  action, resource);\n";
        let d = PolicyDiagnostic::at(
            "p/a.cedar",
            text,
            Some((12, 9)),
            "bad thing".into(),
            Some("do this".into()),
        );
        assert_eq!((d.line, d.column), (Some(2), Some(5)));
        assert!(d.rendered.contains("p/a.cedar:2:5"), "{}", d.rendered);
        assert!(d.rendered.contains("help: do this"), "{}", d.rendered);
        assert_eq!(line_col("ab\ncd", 4), (2, 2));
    }
}
