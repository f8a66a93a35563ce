//! The form of the statements a device signs in its TRE (proof of ownership, discard notice):
//! a domain line, then fields one per line (none empty, none holding a line break), the last a
//! number of seconds since the epoch. One place for the form, so both statements read and
//! write it alike.

/// `domain`, `fields` and `at`, one per line.
pub(crate) fn write(domain: &str, fields: &[&str], at: u64) -> Result<Vec<u8>, &'static str> {
    if fields.iter().any(|f| f.is_empty() || f.contains('\n')) {
        return Err("a field is empty or holds a line break");
    }
    let mut out = String::from(domain);
    for f in fields {
        out.push('\n');
        out.push_str(f);
    }
    out.push('\n');
    out.push_str(&at.to_string());
    Ok(out.into_bytes())
}

/// The `n` fields after `domain`, and the number on the last line; refused unless the bytes
/// are exactly that.
pub(crate) fn read<'a>(
    bytes: &'a [u8],
    domain: &str,
    n: usize,
) -> Result<(Vec<&'a str>, u64), &'static str> {
    let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8")?;
    let lines: Vec<&str> = text.split('\n').collect();
    if lines.len() != n + 2 {
        return Err("not the statement's number of lines");
    }
    if lines[0] != domain {
        return Err("not this kind of statement");
    }
    let at = lines[n + 1]
        .parse()
        .map_err(|_| "the time is not a number")?;
    Ok((lines[1..=n].to_vec(), at))
}

/// A nonce as statements carry it: 16 random octets in lowercase hex (what makes a statement
/// single-use).
pub(crate) fn nonce_ok(nonce: &str) -> bool {
    nonce.len() == 32
        && nonce
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}
