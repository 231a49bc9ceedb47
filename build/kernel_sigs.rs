//! The kernels' signatures, read from the comment-stripped source of kernels/**/*.cu, and the
//! typed Rust launchers generated from them. build.rs includes this file with `#[path]`; so does
//! the library's test build (src/gpu/kernels.rs), for the unit tests at its end.
//!
//! A kernel file defines its entry points two ways:
//! - `extern "C" __global__ void [__launch_bounds__(...)] name(params) { ... }`: one kernel;
//! - `MURA_F32_BF16(name, (params), call);` or `MURA_F32_BF16_BOUNDED(threads, name, (params),
//!   call);` (kernels/dtype.cuh): the two entry points `name_f32` and `name_bf16`, which run
//!   `call` with the activation type `T` (which `params` and `call` name) float or bf16.
//!
//! Each entry point gets a launcher; each stamp also one generic over the activation type
//! (`name<T: Act>`), whose `T` parameters take `Ptr<T>`. Preprocessor lines are skipped, so a
//! macro must not define a kernel other than through those two stamps.

use std::fmt::{self, Write as _};

/// The element type behind a kernel's pointer parameter.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Elem {
    F32,
    F32x4,
    Bf16,
    F16,
    U8,
    I32,
    U32,
    /// A stamp's `T`: f32 in `<name>_f32`, bf16 in `<name>_bf16`.
    Act,
}

/// A kernel parameter's C type.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum CType {
    Ptr(Elem),
    Int,
    Float,
}

/// The activation type a stamp's entry point is instantiated with.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Act {
    F32,
    Bf16,
}

impl Act {
    const BOTH: [Act; 2] = [Act::F32, Act::Bf16];

    /// The entry point's suffix.
    fn suffix(self) -> &'static str {
        match self {
            Act::F32 => "_f32",
            Act::Bf16 => "_bf16",
        }
    }

    /// What `T` is in its C source.
    fn c_type(self) -> &'static str {
        match self {
            Act::F32 => "float",
            Act::Bf16 => "bf16",
        }
    }
}

#[derive(Debug)]
pub struct Param {
    /// The launcher's name for it: snake case, a Rust keyword raw (`r#in`).
    pub name: String,
    pub ty: CType,
    /// The declaration's tokens (`const`, `T`, `*`, `__restrict__`, `x`), for the documentation.
    decl: Vec<String>,
}

/// One definition: an `extern "C" __global__` kernel, or a stamp (two entry points).
#[derive(Debug)]
pub struct Kernel {
    /// The entry point's name; a stamp's base name (`bn_apply_fwd`).
    pub name: String,
    pub params: Vec<Param>,
    pub stamped: bool,
}

impl Kernel {
    /// The names the kernel file defines: `name`, or a stamp's `name_f32` and `name_bf16`.
    pub fn entry_names(&self) -> Vec<String> {
        match self.stamped {
            true => Act::BOTH
                .map(|a| format!("{}{}", self.name, a.suffix()))
                .to_vec(),
            false => vec![self.name.clone()],
        }
    }

    /// The parameter list in C, `T` written as `act`'s type (kept as `T` for `None`).
    fn signature(&self, act: Option<Act>) -> String {
        let decls: Vec<String> = self.params.iter().map(|p| c_decl(&p.decl, act)).collect();
        decls.join(", ")
    }
}

/// A declaration's tokens as C text: `*` joined to the type before it, `T` replaced.
fn c_decl(tokens: &[impl AsRef<str>], act: Option<Act>) -> String {
    let mut s = String::new();
    for t in tokens {
        let t = match (t.as_ref(), act) {
            ("T", Some(a)) => a.c_type(),
            (t, _) => t,
        };
        if !s.is_empty() && t != "*" {
            s.push(' ');
        }
        s += t;
    }
    s
}

/// Why a kernel file's definitions cannot be read: `kernels/bn.cu:12: kernel bn_apply_fwd: ...`.
#[derive(Debug)]
pub struct SigError {
    pub file: String,
    pub line: usize,
    pub kernel: Option<String>,
    pub what: String,
}

impl fmt::Display for SigError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{}:{}: ", self.file, self.line)?;
        if let Some(k) = &self.kernel {
            write!(f, "kernel {k}: ")?;
        }
        f.write_str(&self.what)
    }
}

/// `src` with every comment replaced by spaces (its newlines kept, so lines keep their numbers);
/// string and character literals are kept whole, comment markers in them included. Fails on a
/// block comment left open, with the line it opens on.
fn strip_comments(src: &str) -> Result<String, usize> {
    let b = src.as_bytes();
    let mut out = String::with_capacity(src.len());
    let (mut i, mut line) = (0, 1);
    let blank = |out: &mut String, s: &str| {
        out.extend(s.chars().map(|c| if c == '\n' { '\n' } else { ' ' }));
    };
    while i < b.len() {
        let start = i;
        match (b[i], b.get(i + 1)) {
            (b'/', Some(b'/')) => {
                // To the end of the line; a backslash before the newline continues the comment.
                while i < b.len() && !(b[i] == b'\n' && b[i - 1] != b'\\') {
                    i += 1;
                }
                blank(&mut out, &src[start..i]);
            }
            (b'/', Some(b'*')) => {
                let end = src[i + 2..].find("*/").ok_or(line)?;
                i += 2 + end + 2;
                blank(&mut out, &src[start..i]);
            }
            (q @ (b'"' | b'\''), _) => {
                i += 1;
                while i < b.len() && b[i] != q && b[i] != b'\n' {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
                i = (i + 1).min(b.len());
                out += &src[start..i];
            }
            _ => {
                let len = src[i..].chars().next().unwrap().len_utf8();
                i += len;
                out += &src[start..i];
            }
        }
        line += src[start..i].matches('\n').count();
    }
    Ok(out)
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Ident,
    /// A number, a string or a character literal.
    Literal,
    Punct,
}

#[derive(Clone, Copy, Debug)]
struct Token<'a> {
    kind: Kind,
    text: &'a str,
    line: usize,
}

impl Token<'_> {
    fn is(&self, text: &str) -> bool {
        self.text == text
    }
}

/// The tokens of comment-free C++ source, preprocessor lines (and their continuations) left out.
fn tokens(src: &str) -> Vec<Token<'_>> {
    let b = src.as_bytes();
    let mut out = Vec::new();
    let (mut i, mut line, mut line_start) = (0, 1, true);
    while i < b.len() {
        let c = b[i];
        let start = i;
        if c == b'\n' {
            (line, line_start, i) = (line + 1, true, i + 1);
            continue;
        }
        if c.is_ascii_whitespace() {
            i += 1;
            continue;
        }
        if c == b'#' && line_start {
            while i < b.len() && !(b[i] == b'\n' && b[i - 1] != b'\\') {
                line += usize::from(b[i] == b'\n');
                i += 1;
            }
            continue;
        }
        line_start = false;
        let word = |i: usize| {
            b.get(i)
                .is_some_and(|c| c.is_ascii_alphanumeric() || *c == b'_')
        };
        let kind = if c.is_ascii_alphabetic() || c == b'_' {
            while word(i) {
                i += 1;
            }
            Kind::Ident
        } else if c.is_ascii_digit() {
            while word(i) || b.get(i) == Some(&b'.') {
                i += 1;
            }
            Kind::Literal
        } else if c == b'"' || c == b'\'' {
            i += 1;
            while i < b.len() && b[i] != c && b[i] != b'\n' {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i = (i + 1).min(b.len());
            Kind::Literal
        } else {
            i += src[i..].chars().next().unwrap().len_utf8();
            Kind::Punct
        };
        out.push(Token {
            kind,
            text: &src[start..i],
            line,
        });
    }
    out
}

/// The stamps of kernels/dtype.cuh and how many arguments each takes.
const STAMPS: [(&str, usize); 2] = [("MURA_F32_BF16", 3), ("MURA_F32_BF16_BOUNDED", 4)];

/// Reads the definitions of a kernel file's source; `file` names it in errors.
pub fn kernels_of(src: &str, file: &str) -> Result<Vec<Kernel>, SigError> {
    let stripped = strip_comments(src).map_err(|line| SigError {
        file: file.into(),
        line,
        kernel: None,
        what: "a block comment is never closed".into(),
    })?;
    let toks = tokens(&stripped);
    let p = Parser { toks: &toks, file };
    let mut kernels: Vec<Kernel> = Vec::new();
    let mut i = 0;
    while i < toks.len() {
        let t = toks[i];
        let (kernel, next) = if t.is("__global__") {
            if !(i >= 2 && toks[i - 2].is("extern") && toks[i - 1].is("\"C\"")) {
                let what = "a `__global__` function must be `extern \"C\"` (no launcher finds a \
                            mangled C++ name)";
                return Err(p.error(t.line, None, what));
            }
            p.kernel(i + 1)?
        } else if let Some(&(macro_name, arity)) = STAMPS.iter().find(|(m, _)| t.is(m)) {
            p.stamp(i, macro_name, arity)?
        } else {
            i += 1;
            continue;
        };
        let names = kernel.entry_names();
        let earlier = kernels.iter().flat_map(Kernel::entry_names);
        if let Some(twice) = earlier.into_iter().find(|n| names.contains(n)) {
            let what = "defined twice (a C name has no overloads)";
            return Err(p.error(t.line, Some(&twice), what));
        }
        kernels.push(kernel);
        i = next;
    }
    Ok(kernels)
}

struct Parser<'t, 's> {
    toks: &'t [Token<'s>],
    file: &'t str,
}

impl<'t, 's> Parser<'t, 's> {
    /// The error at `line`, about `kernel` when it is known.
    fn error(&self, line: usize, kernel: Option<&str>, what: &str) -> SigError {
        SigError {
            file: self.file.into(),
            line,
            kernel: kernel.map(Into::into),
            what: what.into(),
        }
    }

    /// The line of token `at` (the last line past the end).
    fn line(&self, at: usize) -> usize {
        self.toks.get(at).or(self.toks.last()).map_or(1, |t| t.line)
    }

    /// The token at `at`, which must be `want` (`what` describes it for the error).
    fn expect(
        &self,
        at: usize,
        want: &str,
        kernel: Option<&str>,
        what: &str,
    ) -> Result<(), SigError> {
        let found = match self.toks.get(at) {
            Some(t) if t.is(want) => return Ok(()),
            Some(t) => format!("`{}`", t.text),
            None => "the end of the file".into(),
        };
        Err(self.error(
            self.line(at),
            kernel,
            &format!("expected {what}, found {found}"),
        ))
    }

    /// The tokens inside the parentheses that open at `open`, and the index after the `)`.
    fn group(
        &self,
        open: usize,
        kernel: Option<&str>,
    ) -> Result<(&'t [Token<'s>], usize), SigError> {
        self.expect(open, "(", kernel, "`(`")?;
        let mut depth = 0;
        for (i, t) in self.toks.iter().enumerate().skip(open) {
            depth += i32::from(t.is("(")) - i32::from(t.is(")"));
            if depth == 0 {
                return Ok((&self.toks[open + 1..i], i + 1));
            }
        }
        Err(self.error(self.line(open), kernel, "this `(` is never closed"))
    }

    /// `void [__launch_bounds__(...)] name(params) {`, from `at` (after `extern "C" __global__`).
    fn kernel(&self, mut at: usize) -> Result<(Kernel, usize), SigError> {
        self.expect(at, "void", None, "`void` (a kernel returns nothing)")?;
        at += 1;
        if self.toks.get(at).is_some_and(|t| t.is("__launch_bounds__")) {
            at = self.group(at + 1, None)?.1;
        }
        let name = match self.toks.get(at) {
            Some(t) if t.kind == Kind::Ident => t.text,
            _ => return Err(self.error(self.line(at), None, "expected the kernel's name")),
        };
        let (list, after) = self.group(at + 1, Some(name))?;
        let body = "its body, `{` (a kernel is defined where it is declared)";
        self.expect(after, "{", Some(name), body)?;
        let params = self.params(list, name, false)?;
        let kernel = Kernel {
            name: name.into(),
            params,
            stamped: false,
        };
        Ok((kernel, after))
    }

    /// `MACRO(name, (params), call)` or `MACRO(threads, name, (params), call)` at `at`.
    fn stamp(
        &self,
        at: usize,
        macro_name: &str,
        arity: usize,
    ) -> Result<(Kernel, usize), SigError> {
        let (inner, after) = self.group(at + 1, None)?;
        let args: Vec<&[Token]> = split_top(inner).collect();
        let usage = match arity {
            3 => "(name, (params), call)",
            _ => "(threads, name, (params), call)",
        };
        let fail = |kernel, why: &str| {
            let what = format!("{macro_name} takes {usage}: {why}");
            Err(self.error(self.line(at), kernel, &what))
        };
        if args.len() != arity || args.iter().any(|a| a.is_empty()) {
            return fail(None, &format!("{} non-empty arguments given", args.len()));
        }
        let name = match args[arity - 3] {
            [t] if t.kind == Kind::Ident => t.text,
            _ => return fail(None, "the name is one identifier"),
        };
        let list = match args[arity - 2] {
            [open, inner @ .., close] if open.is("(") && close.is(")") => inner,
            _ => return fail(Some(name), "the parameters in parentheses"),
        };
        let params = self.params(list, name, true)?;
        if !params.iter().any(|p| p.ty == CType::Ptr(Elem::Act)) {
            return fail(
                Some(name),
                "no parameter is a `T*` (write it as one kernel)",
            );
        }
        let kernel = Kernel {
            name: name.into(),
            params,
            stamped: true,
        };
        Ok((kernel, after))
    }

    /// A parameter list (the tokens between its parentheses).
    fn params(&self, list: &[Token], kernel: &str, stamped: bool) -> Result<Vec<Param>, SigError> {
        if let [] | [Token { text: "void", .. }] = list {
            return Ok(Vec::new());
        }
        let mut params: Vec<Param> = Vec::new();
        for decl in split_top(list) {
            let text: Vec<&str> = decl.iter().map(|t| t.text).collect();
            let line = decl.first().map_or(self.line(usize::MAX), |t| t.line);
            let fail = |why: &str| {
                let what = format!("parameter `{}`: {why}", c_decl(&text, None));
                self.error(line, Some(kernel), &what)
            };
            let p = param(decl, stamped).map_err(|why| fail(&why))?;
            if params.iter().any(|q| q.name == p.name) {
                return Err(fail(
                    "a second parameter of this name (launchers' names are lower case)",
                ));
            }
            params.push(p);
        }
        Ok(params)
    }
}

/// `tokens` split at the commas outside parentheses, braces and brackets.
fn split_top<'a, 's>(tokens: &'a [Token<'s>]) -> impl Iterator<Item = &'a [Token<'s>]> {
    let mut depth = 0;
    tokens.split(move |t| {
        depth += i32::from(matches!(t.text, "(" | "{" | "["))
            - i32::from(matches!(t.text, ")" | "}" | "]"));
        depth == 0 && t.is(",")
    })
}

/// Rust keywords a C parameter may be named (strict and reserved ones a kernel might use).
const RUST_KEYWORDS: [&str; 24] = [
    "as", "box", "crate", "dyn", "enum", "final", "fn", "impl", "in", "let", "loop", "match",
    "mod", "move", "mut", "priv", "pub", "ref", "self", "trait", "type", "use", "where", "yield",
];

/// One parameter declaration: `const float* __restrict__ x`, `int n`, `const T* x` (in a stamp).
fn param(decl: &[Token], stamped: bool) -> Result<Param, String> {
    const KNOWN: &str = "the launcher generator knows float, float4, bf16, half, unsigned char, \
                         int and unsigned pointers (and `T` ones in a stamp), and int and float values";
    if decl.iter().any(|t| t.is("=")) {
        return Err("a default argument (a launcher passes every parameter)".into());
    }
    if let Some(t) = decl.iter().find(|t| t.kind != Kind::Ident && !t.is("*")) {
        return Err(format!("`{}` in a parameter ({KNOWN})", t.text));
    }
    let pointer = decl.iter().filter(|t| t.is("*")).count();
    let words: Vec<&str> = decl
        .iter()
        .map(|t| t.text)
        .filter(|w| {
            !matches!(
                *w,
                "*" | "const" | "volatile" | "__restrict__" | "__restrict"
            )
        })
        .collect();
    let [ty @ .., name] = &words[..] else {
        return Err("no name".into());
    };
    if ty.is_empty() {
        return Err("a type and a name expected".into());
    }
    let elem = match ty.join(" ").as_str() {
        "float" => Elem::F32,
        "float4" => Elem::F32x4,
        "bf16" | "__nv_bfloat16" | "nv_bfloat16" => Elem::Bf16,
        "__half" | "half" => Elem::F16,
        "unsigned char" => Elem::U8,
        "int" => Elem::I32,
        "unsigned" | "unsigned int" => Elem::U32,
        "T" if stamped => Elem::Act,
        "T" => return Err("`T` outside a MURA_F32_BF16 stamp".into()),
        other => return Err(format!("unsupported type `{other}` ({KNOWN})")),
    };
    let ty = match (pointer, elem) {
        (1, e) => CType::Ptr(e),
        (0, Elem::I32) => CType::Int,
        (0, Elem::F32) => CType::Float,
        _ => {
            return Err(format!(
                "unsupported as a value or at this depth of pointers ({KNOWN})"
            ))
        }
    };
    // Rust's snake case for the launcher (`R` → `r`), a keyword as a raw identifier (`r#in`).
    let name = name.to_lowercase();
    let name = match RUST_KEYWORDS.contains(&name.as_str()) {
        true => format!("r#{name}"),
        false => name,
    };
    let decl = decl.iter().map(|t| t.text.to_string()).collect();
    Ok(Param { name, ty, decl })
}

/// Rust type of a pointer's element; `T` for a stamp's in the generic launcher (`act` None).
fn rust_elem(e: Elem, act: Option<Act>) -> &'static str {
    match (e, act) {
        (Elem::F32, _) | (Elem::Act, Some(Act::F32)) => "f32",
        (Elem::Bf16, _) | (Elem::Act, Some(Act::Bf16)) => "bf16",
        (Elem::Act, None) => "T",
        (Elem::F32x4, _) => "[f32; 4]",
        (Elem::F16, _) => "f16",
        (Elem::U8, _) => "u8",
        (Elem::I32, _) => "i32",
        (Elem::U32, _) => "u32",
    }
}

/// The Rust parameter type of a C parameter.
fn rust_param(ty: CType, act: Option<Act>) -> String {
    match ty {
        CType::Ptr(e) => format!("Ptr<{}>", rust_elem(e, act)),
        CType::Int => "impl CInt".into(),
        CType::Float => "f32".into(),
    }
}

/// How a launcher picks its entry point: the kernel itself, one of a stamp's, or a stamp's by `T`.
#[derive(Clone, Copy)]
enum Entry {
    Plain,
    Stamped(Act),
    Generic,
}

/// One launcher: `pub unsafe fn name[<T: Act>](d, at, params...) -> Result<()>`.
fn launcher(rs: &mut String, k: &Kernel, file: &str, entry: Entry) {
    let base = &k.name;
    let (fn_name, act, doc_name, c_name) = match entry {
        Entry::Plain => (base.clone(), None, format!("`{base}`"), base.clone()),
        Entry::Stamped(a) => {
            let name = format!("{base}{}", a.suffix());
            (name.clone(), Some(a), format!("`{name}`"), name)
        }
        Entry::Generic => {
            let doc = format!("`{base}_f32` or `{base}_bf16` (by `T`)");
            (format!("{base}<T: Act>"), None, doc, format!("{base}_<T>"))
        }
    };
    writeln!(rs, "/// Launches {doc_name} of `kernels/{file}`:").unwrap();
    writeln!(rs, "/// `{c_name}({})`.", k.signature(act)).unwrap();
    writeln!(rs, "///\n/// # Safety").unwrap();
    writeln!(
        rs,
        "/// Every pointer must address device memory valid for all that the kernel reads and writes\n\
         /// at these sizes and this launch shape (see the kernel's comment), as with cuLaunchKernel."
    )
    .unwrap();
    writeln!(rs, "#[allow(clippy::too_many_arguments)]").unwrap();
    write!(rs, "pub unsafe fn {fn_name}(d: &dyn Driver, at: Launch").unwrap();
    for p in &k.params {
        write!(rs, ", {}: {}", p.name, rust_param(p.ty, act)).unwrap();
    }
    writeln!(rs, ") -> Result<()> {{").unwrap();
    match entry {
        Entry::Generic => writeln!(
            rs,
            "    let name = match T::PRECISION {{\n        Precision::F32 => \"{base}_f32\",\n        \
             Precision::Bf16 => \"{base}_bf16\",\n    }};"
        ),
        _ => writeln!(rs, "    let name = \"{c_name}\";"),
    }
    .unwrap();
    for p in &k.params {
        match p.ty {
            CType::Int => writeln!(rs, "    let mut {0} = {0}.c_int(name, \"{0}\")?;", p.name),
            _ => writeln!(rs, "    let mut {0} = {0};", p.name),
        }
        .unwrap();
    }
    let args: Vec<String> = k
        .params
        .iter()
        .map(|p| format!("arg(&mut {})", p.name))
        .collect();
    writeln!(rs, "    let mut params = [{}];", args.join(", ")).unwrap();
    writeln!(
        rs,
        "    // SAFETY: `params` follows the kernel's signature (generated from it); the memory is the\n    \
         // caller's promise.\n    unsafe {{ launch_params(d, name, at, &mut params) }}\n}}\n"
    )
    .unwrap();
}

/// The launchers of some kernels, each with the file (under kernels/) that defines it: one per
/// entry point, and one generic over the activation type per stamp.
pub fn launchers<'a>(kernels: impl IntoIterator<Item = (&'a Kernel, &'a str)>) -> String {
    let mut rs = String::new();
    for (k, file) in kernels {
        match k.stamped {
            false => launcher(&mut rs, k, file, Entry::Plain),
            true => {
                for a in Act::BOTH {
                    launcher(&mut rs, k, file, Entry::Stamped(a));
                }
                launcher(&mut rs, k, file, Entry::Generic);
            }
        }
    }
    rs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernels(src: &str) -> Vec<Kernel> {
        kernels_of(src, "kernels/t.cu").unwrap_or_else(|e| panic!("{e}"))
    }

    fn error(src: &str) -> String {
        match kernels_of(src, "kernels/t.cu") {
            Ok(ks) => panic!("read {} kernels, expected an error", ks.len()),
            Err(e) => e.to_string(),
        }
    }

    fn types(k: &Kernel) -> Vec<CType> {
        k.params.iter().map(|p| p.ty).collect()
    }

    #[test]
    fn comments_hide_kernels_and_split_no_declaration() {
        let src = r#"
// extern "C" __global__ void line_commented(float* x) {}
/* extern "C" __global__ void block_commented(float* x) {}
   still the comment */
extern "C" /* between */ __global__ void // the name follows
    kept(float* /* the output */ y, // and then
         int n /* its length, ", no string */) { const char* s = "/* not a comment */"; }
#define NOT_A_KERNEL extern "C" __global__ void hidden(int n) {}
"#;
        let ks = kernels(src);
        let names: Vec<&str> = ks.iter().map(|k| k.name.as_str()).collect();
        assert_eq!(names, ["kept"]);
        assert_eq!(types(&ks[0]), [CType::Ptr(Elem::F32), CType::Int]);
        assert_eq!(ks[0].signature(None), "float* y, int n");
    }

    #[test]
    fn a_comment_marker_in_a_string_starts_no_comment() {
        let src = "const char* s = \"//\"; extern \"C\" __global__ void k(int n) {}";
        assert_eq!(kernels(src)[0].name, "k");
        let src = "const char* s = \"/*\"; extern \"C\" __global__ void k(int n) {} // */";
        assert_eq!(kernels(src)[0].name, "k");
    }

    #[test]
    fn pointer_constness_and_restrict_leave_the_element_type() {
        let src = "extern \"C\" __global__ void __launch_bounds__(256, 2)
            k(const float* a, float* __restrict__ b, const __nv_bfloat16* __restrict__ c,
              float* const d, const unsigned char* __restrict e, unsigned* f, unsigned int* g,
              float h, int In) {}";
        let k = &kernels(src)[0];
        assert_eq!(k.name, "k");
        use {CType::Ptr, Elem::*};
        let want = [
            Ptr(F32),
            Ptr(F32),
            Ptr(Bf16),
            Ptr(F32),
            Ptr(U8),
            Ptr(U32),
            Ptr(U32),
        ];
        assert_eq!(types(k), [&want[..], &[CType::Float, CType::Int]].concat());
        let names: Vec<&str> = k.params.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["a", "b", "c", "d", "e", "f", "g", "h", "r#in"]);
    }

    #[test]
    fn overloaded_device_functions_are_not_kernels_and_a_kernel_name_is_one_kernel() {
        let src = "__device__ float ld(const float* p) { return *p; }
            __device__ float ld(const bf16* p) { return 0; }
            template <class T> __device__ void body(T* y, int n) {}
            extern \"C\" __global__ void k(float* y, int n) { body<float>(y, n); }";
        assert_eq!(kernels(src).len(), 1);
        let twice = "extern \"C\" __global__ void k(float* y) {}\n\
                     extern \"C\" __global__ void k(float* y, int n) {}";
        assert_eq!(
            error(twice),
            "kernels/t.cu:2: kernel k: defined twice (a C name has no overloads)"
        );
    }

    #[test]
    fn a_stamp_is_two_entry_points_with_t_substituted() {
        let src =
            "MURA_F32_BF16(gap_fwd, (float* __restrict__ feat, const T* __restrict__ x, int n),
                                gap_fwd<T>(feat, x, n));
            MURA_F32_BF16_BOUNDED(CONV_THREADS, conv_fwd, (T* y, const float* w, int n),
                                  conv_fwd<T>(y, w, Step{n, 2}));";
        let ks = kernels(src);
        assert_eq!(ks.len(), 2);
        assert_eq!(ks[0].entry_names(), ["gap_fwd_f32", "gap_fwd_bf16"]);
        assert_eq!(ks[1].entry_names(), ["conv_fwd_f32", "conv_fwd_bf16"]);
        assert_eq!(
            types(&ks[1]),
            [CType::Ptr(Elem::Act), CType::Ptr(Elem::F32), CType::Int]
        );
        let sig = |a| ks[0].signature(a);
        assert_eq!(
            sig(Some(Act::F32)),
            "float* __restrict__ feat, const float* __restrict__ x, int n"
        );
        assert_eq!(
            sig(Some(Act::Bf16)),
            "float* __restrict__ feat, const bf16* __restrict__ x, int n"
        );
        assert_eq!(
            sig(None),
            "float* __restrict__ feat, const T* __restrict__ x, int n"
        );
        let twice =
            "MURA_F32_BF16(k, (T* y), f<T>(y));\nextern \"C\" __global__ void k_bf16(float* y) {}";
        assert_eq!(
            error(twice),
            "kernels/t.cu:2: kernel k_bf16: defined twice (a C name has no overloads)"
        );
    }

    #[test]
    fn launchers_of_a_stamp_are_typed_and_generic() {
        let src =
            "MURA_F32_BF16(gap_fwd, (float* feat, const T* x, int n), gap_fwd<T>(feat, x, n));
            extern \"C\" __global__ void cast_fwd_bf16(bf16* y, const float* x, int n) {}";
        let ks = kernels(src);
        let rs = launchers(ks.iter().map(|k| (k, "t.cu")));
        let heads: Vec<&str> = rs
            .lines()
            .filter(|l| l.starts_with("pub unsafe fn"))
            .collect();
        let common = "(d: &dyn Driver, at: Launch, feat: Ptr<f32>, x: Ptr<";
        assert_eq!(
            heads,
            [
                format!("pub unsafe fn gap_fwd_f32{common}f32>, n: impl CInt) -> Result<()> {{"),
                format!("pub unsafe fn gap_fwd_bf16{common}bf16>, n: impl CInt) -> Result<()> {{"),
                format!("pub unsafe fn gap_fwd<T: Act>{common}T>, n: impl CInt) -> Result<()> {{"),
                "pub unsafe fn cast_fwd_bf16(d: &dyn Driver, at: Launch, y: Ptr<bf16>, x: Ptr<f32>, \
                 n: impl CInt) -> Result<()> {"
                    .into(),
            ]
        );
        assert!(rs.contains("let name = \"gap_fwd_bf16\";"));
        assert!(rs.contains(
            "Precision::F32 => \"gap_fwd_f32\",\n        Precision::Bf16 => \"gap_fwd_bf16\","
        ));
        assert!(rs.contains("/// `gap_fwd_bf16(float* feat, const bf16* x, int n)`."));
    }

    #[test]
    fn malformed_declarations_are_errors_naming_file_line_and_kernel() {
        let cases = [
            (
                "extern \"C\" __global__ void k(float* y,\n int n = 4) {}",
                "kernels/t.cu:2: kernel k: parameter `int n = 4`: a default argument (a launcher \
                 passes every parameter)",
            ),
            (
                "extern \"C\" __global__ void k(double* y) {}",
                "kernels/t.cu:1: kernel k: parameter `double* y`: unsupported type `double`",
            ),
            (
                "extern \"C\" __global__ void k(float** y) {}",
                "kernels/t.cu:1: kernel k: parameter `float** y`: unsupported as a value or at \
                 this depth of pointers",
            ),
            (
                "extern \"C\" __global__ void k(float& y) {}",
                "kernels/t.cu:1: kernel k: parameter `float & y`: `&` in a parameter",
            ),
            ("extern \"C\" __global__ void k(int) {}", "kernels/t.cu:1: kernel k: parameter `int`: a type and a name expected"),
            (
                "extern \"C\" __global__ void k(const T* x) {}",
                "kernels/t.cu:1: kernel k: parameter `const T* x`: `T` outside a MURA_F32_BF16 stamp",
            ),
            (
                "extern \"C\" __global__ void k(int n, int N) {}",
                "kernels/t.cu:1: kernel k: parameter `int N`: a second parameter of this name",
            ),
            (
                "extern \"C\" __global__ void k(float* y);",
                "kernels/t.cu:1: kernel k: expected its body, `{`",
            ),
            ("\n\nextern \"C\" __global__ void k(float* y {}", "kernels/t.cu:3: kernel k: this `(` is never closed"),
            ("extern \"C\" __global__ int k(float* y) {}", "kernels/t.cu:1: expected `void`"),
            ("__global__ void k(float* y) {}", "kernels/t.cu:1: a `__global__` function must be `extern \"C\"`"),
            ("/* extern \"C\" __global__\n\n void k(float* y) {}", "kernels/t.cu:1: a block comment is never closed"),
            ("MURA_F32_BF16(k, (T* y));", "kernels/t.cu:1: MURA_F32_BF16 takes (name, (params), call): 2 non-empty"),
            (
                "MURA_F32_BF16_BOUNDED(k, (T* y), f<T>(y));",
                "kernels/t.cu:1: MURA_F32_BF16_BOUNDED takes (threads, name, (params), call): 3 non-empty",
            ),
            (
                "MURA_F32_BF16(k, T* y, f<T>(y));",
                "kernels/t.cu:1: kernel k: MURA_F32_BF16 takes (name, (params), call): the parameters in \
                 parentheses",
            ),
            (
                "MURA_F32_BF16(k, (float* y), f(y));",
                "kernels/t.cu:1: kernel k: MURA_F32_BF16 takes (name, (params), call): no parameter is a `T*`",
            ),
        ];
        for (src, want) in cases {
            let got = error(src);
            assert!(
                got.starts_with(want),
                "for {src:?}:\n got  {got}\n want {want}..."
            );
        }
    }
}
