//! What GStreamer's elements and errors tell, made safe to use: URI checks that cannot hang,
//! error domains and codes as plain data, debug text without source positions, a TCP probe of
//! a failing network input, and typed property setting on elements we did not create.

use std::time::Duration;

use gstreamer as gst;
use gstreamer::prelude::*;

use super::SourceError;
use crate::failure::{self, Domain, Probe};

/// Any source element refuses a URI it cannot parse (rtspsrc: a user without a password);
/// uridecodebin would report it only once playing. Checked on a helper thread with a timeout:
/// some elements hang in their own teardown (ristsrc in 1.22 was seen to), and a stream must
/// fail then, not hang.
pub(super) fn check_uri(uri: &str) -> Result<(), SourceError> {
    let invalid = |why: String| SourceError::Invalid(crate::events::redact_text(uri), why);
    let (tx, rx) = std::sync::mpsc::channel();
    let owned = uri.to_string();
    std::thread::Builder::new()
        .name("source-check".into())
        .spawn(move || {
            let r = gst::Element::make_from_uri(gst::URIType::Src, &owned, None)
                .map(drop)
                .map_err(|e| e.to_string());
            let _ = tx.send(r);
        })
        .map_err(|e| SourceError::Gst(format!("cannot start a thread: {e}")))?;
    match rx.recv_timeout(Duration::from_secs(3)) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(invalid(format!("no GStreamer source takes this URI ({e})"))),
        Err(_) => Err(invalid(
            "the GStreamer source for this scheme hung while taking the URI".into(),
        )),
    }
}

/// A debug line without GStreamer's source position and element path
/// (`../gst/x.c(12): func (): /GstPipeline:p/GstX:x:`), which say nothing to a user.
pub(super) fn without_position(line: &str) -> &str {
    let Some(c) = line.find(".c(") else {
        return line.trim();
    };
    let rest = &line[c..];
    let Some(f) = rest.find("(): ") else {
        return line.trim();
    };
    let rest = &rest[f + 4..];
    if !rest.starts_with('/') {
        return rest.trim();
    }
    // The element path ends at the first ": " (or the line).
    match rest.find(": ") {
        Some(i) => rest[i + 2..].trim(),
        None => "",
    }
}

pub(super) fn domain_of(e: &gst::glib::Error) -> Domain {
    if e.kind::<gst::CoreError>().is_some() {
        Domain::Core
    } else if e.kind::<gst::LibraryError>().is_some() {
        Domain::Library
    } else if e.kind::<gst::ResourceError>().is_some() {
        Domain::Resource
    } else if e.kind::<gst::StreamError>().is_some() {
        Domain::Stream
    } else {
        Domain::Other
    }
}

/// The error enum's variant in snake case (`NotAuthorized` -> `not_authorized`).
pub(super) fn code_of(e: &gst::glib::Error) -> String {
    let name = if let Some(k) = e.kind::<gst::CoreError>() {
        format!("{k:?}")
    } else if let Some(k) = e.kind::<gst::LibraryError>() {
        format!("{k:?}")
    } else if let Some(k) = e.kind::<gst::ResourceError>() {
        format!("{k:?}")
    } else if let Some(k) = e.kind::<gst::StreamError>() {
        format!("{k:?}")
    } else {
        String::new()
    };
    let mut out = String::new();
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_lowercase());
    }
    out
}

/// Connect to a network URI's host to learn why its source failed (refused, unresolved, timed
/// out); a short timeout, since the stream thread waits for it.
pub(super) fn probe(uri: &str) -> Probe {
    use std::net::{TcpStream, ToSocketAddrs};
    let Some((host, port)) = failure::host_port(uri) else {
        return Probe::Skipped;
    };
    let at = format!("{host}:{port}");
    let Some(addr) = (host.as_str(), port)
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
    else {
        return Probe::Unresolved(host);
    };
    match TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
        Ok(_) => Probe::Reachable,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Probe::Refused(at),
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => Probe::TimedOut(at),
        Err(_) => Probe::Refused(at),
    }
}

/// Set `name` on an element we did not create from its string form, typed by the element's own
/// property spec; a missing property or a value it does not take is skipped, never a panic.
pub(super) fn set_checked(el: &gst::Element, name: &str, value: &str) -> bool {
    let Some(pspec) = el.find_property(name) else {
        return false;
    };
    if !pspec.flags().contains(gst::glib::ParamFlags::WRITABLE) {
        return false;
    }
    match gst::glib::Value::deserialize_with_pspec(value, &pspec) {
        Ok(v) if v.type_().is_a(pspec.value_type()) => {
            el.set_property_from_value(name, &v);
            true
        }
        _ => {
            eprintln!(
                "warning: {} does not take {name} = {value}; left at its default",
                el.factory()
                    .map_or("the source".into(), |f| f.name().to_string())
            );
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_text_loses_its_source_position() {
        assert_eq!(
            without_position("../ext/soup/gstsouphttpsrc.c(1683): gst_soup_http_src_parse_status (): /GstPipeline:pipeline0/GstURIDecodeBin:uridecodebin0/GstSoupHTTPSrc:source:"),
            ""
        );
        assert_eq!(
            without_position("../gst/rtsp/gstrtspsrc.c(8336): gst_rtspsrc_retrieve_sdp (): /GstPipeline:p/GstRTSPSrc:source: Failed to connect."),
            "Failed to connect."
        );
        assert_eq!(
            without_position("no known streams found"),
            "no known streams found"
        );
    }
}
