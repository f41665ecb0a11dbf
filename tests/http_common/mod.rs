//! Reading an HTTP/1.1 answer in the metrics tests (tests/metrics_export.rs,
//! tests/metrics_cli.rs): the server closes each connection after one response.
#![allow(dead_code)]

use std::io::Read;
use std::net::TcpStream;

/// One response: status code (0 when the status line is not one), head and body.
pub struct Reply {
    pub status: u16,
    pub head: String,
    pub body: String,
}

/// Reads the response to its end (the server closes the connection) and splits it.
pub fn read_reply(s: &mut TcpStream) -> Reply {
    let mut bytes = Vec::new();
    s.read_to_end(&mut bytes).unwrap();
    let text = String::from_utf8(bytes).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Reply {
        status,
        head: head.to_string(),
        body: body.to_string(),
    }
}
