//! Just enough DNS (RFC 1035, SRV from RFC 2782) for the e2e agent to ask the cluster's real
//! CoreDNS for a slice's A and SRV records, from a pod or from the remote host, without a
//! resolver library in the image. Pure: build a query, read an answer.

/// The record types the suite asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordType {
    A,
    Aaaa,
    Srv,
}

impl RecordType {
    fn code(self) -> u16 {
        match self {
            RecordType::A => 1,
            RecordType::Aaaa => 28,
            RecordType::Srv => 33,
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text.to_ascii_uppercase().as_str() {
            "A" => Some(RecordType::A),
            "AAAA" => Some(RecordType::Aaaa),
            "SRV" => Some(RecordType::Srv),
            _ => None,
        }
    }
}

/// An answer record, as the agent prints it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    A(std::net::Ipv4Addr),
    Aaaa(std::net::Ipv6Addr),
    Srv {
        priority: u16,
        weight: u16,
        port: u16,
        target: String,
    },
}

impl std::fmt::Display for Record {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Record::A(ip) => write!(f, "A {ip}"),
            Record::Aaaa(ip) => write!(f, "AAAA {ip}"),
            Record::Srv {
                priority,
                weight,
                port,
                target,
            } => write!(f, "SRV {priority} {weight} {port} {target}"),
        }
    }
}

/// A recursive query for `name` of type `rtype` with transaction id `id`.
pub fn query(id: u16, name: &str, rtype: RecordType) -> Vec<u8> {
    let mut q = Vec::with_capacity(32 + name.len());
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00]); // RD
    q.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]); // 1 question
    for label in name.trim_end_matches('.').split('.') {
        q.push(label.len().min(63) as u8);
        q.extend_from_slice(&label.as_bytes()[..label.len().min(63)]);
    }
    q.push(0);
    q.extend_from_slice(&rtype.code().to_be_bytes());
    q.extend_from_slice(&[0, 1]); // IN
    q
}

/// The answers of `rtype` in a response to query `id`.
pub fn answers(msg: &[u8], id: u16, rtype: RecordType) -> Result<Vec<Record>, String> {
    let u16_at = |i: usize| -> Result<u16, String> {
        Ok(u16::from_be_bytes([
            *msg.get(i).ok_or("short message")?,
            *msg.get(i + 1).ok_or("short message")?,
        ]))
    };
    if u16_at(0)? != id {
        return Err("answer to another query".into());
    }
    let rcode = u16_at(2)? & 0x000f;
    if rcode != 0 {
        return Err(format!("rcode {rcode}"));
    }
    let (qd, an) = (u16_at(4)?, u16_at(6)?);
    let mut at = 12;
    for _ in 0..qd {
        at = skip_name(msg, at)? + 4;
    }
    let mut out = Vec::new();
    for _ in 0..an {
        at = skip_name(msg, at)?;
        let (ty, len) = (u16_at(at)?, usize::from(u16_at(at + 8)?));
        let data = at + 10;
        if msg.len() < data + len {
            return Err("short record".into());
        }
        if ty == rtype.code() {
            out.push(match rtype {
                RecordType::A if len == 4 => Record::A(std::net::Ipv4Addr::new(
                    msg[data],
                    msg[data + 1],
                    msg[data + 2],
                    msg[data + 3],
                )),
                RecordType::Aaaa if len == 16 => {
                    let mut b = [0u8; 16];
                    b.copy_from_slice(&msg[data..data + 16]);
                    Record::Aaaa(std::net::Ipv6Addr::from(b))
                }
                RecordType::Srv if len >= 7 => Record::Srv {
                    priority: u16_at(data)?,
                    weight: u16_at(data + 2)?,
                    port: u16_at(data + 4)?,
                    target: read_name(msg, data + 6)?,
                },
                _ => return Err("malformed record".into()),
            });
        }
        at = data + len;
    }
    Ok(out)
}

/// The offset after the (possibly compressed) name at `at`.
fn skip_name(msg: &[u8], mut at: usize) -> Result<usize, String> {
    loop {
        let len = *msg.get(at).ok_or("short name")?;
        match len {
            0 => return Ok(at + 1),
            l if l & 0xc0 == 0xc0 => return Ok(at + 2),
            l => at += 1 + usize::from(l),
        }
    }
}

/// The name at `at`, following compression pointers (a bounded number of them).
fn read_name(msg: &[u8], mut at: usize) -> Result<String, String> {
    let mut labels = Vec::new();
    for _ in 0..64 {
        let len = *msg.get(at).ok_or("short name")?;
        if len == 0 {
            return Ok(labels.join("."));
        }
        if len & 0xc0 == 0xc0 {
            let lo = *msg.get(at + 1).ok_or("short pointer")?;
            at = (usize::from(len & 0x3f) << 8) | usize::from(lo);
            continue;
        }
        let label = msg
            .get(at + 1..at + 1 + usize::from(len))
            .ok_or("short label")?;
        labels.push(String::from_utf8_lossy(label).into_owned());
        at += 1 + usize::from(len);
    }
    Err("name pointer loop".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A response as CoreDNS writes it: the question echoed, answers with compressed names.
    fn response(id: u16, question: &[u8], answers: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut m = id.to_be_bytes().to_vec();
        m.extend_from_slice(&[0x81, 0x80, 0, 1]);
        m.extend_from_slice(&(answers.len() as u16).to_be_bytes());
        m.extend_from_slice(&[0, 0, 0, 0]);
        m.extend_from_slice(&question[12..]);
        for (ty, data) in answers {
            m.extend_from_slice(&[0xc0, 12]);
            m.extend_from_slice(&ty.to_be_bytes());
            m.extend_from_slice(&[0, 1, 0, 0, 0, 5]);
            m.extend_from_slice(&(data.len() as u16).to_be_bytes());
            m.extend_from_slice(data);
        }
        m
    }

    #[test]
    fn reads_a_and_srv_answers() {
        let q = query(7, "voice.tel.svc.cluster.local", RecordType::A);
        let r = response(
            7,
            &q,
            &[(1, vec![198, 18, 0, 11]), (1, vec![198, 18, 0, 12])],
        );
        assert_eq!(
            answers(&r, 7, RecordType::A).unwrap(),
            [
                Record::A("198.18.0.11".parse().unwrap()),
                Record::A("198.18.0.12".parse().unwrap())
            ]
        );
        let q = query(8, "_sip._udp.voice.tel.svc.cluster.local", RecordType::Srv);
        // priority 0, weight 100, port 40000, target: a label then a pointer to the question.
        let mut srv = vec![0, 0, 0, 100, 0x9c, 0x40, 4];
        srv.extend_from_slice(b"node");
        srv.extend_from_slice(&[0xc0, 12]);
        let r = response(8, &q, &[(33, srv)]);
        let got = answers(&r, 8, RecordType::Srv).unwrap();
        assert_eq!(
            got[0].to_string(),
            "SRV 0 100 40000 node._sip._udp.voice.tel.svc.cluster.local"
        );
        assert!(answers(&r, 9, RecordType::Srv).is_err(), "another id");
        let q = query(9, "voice.tel.svc.cluster.local", RecordType::Aaaa);
        let six: std::net::Ipv6Addr = "2001:2:0:1::2".parse().unwrap();
        let r = response(9, &q, &[(28, six.octets().to_vec())]);
        assert_eq!(
            answers(&r, 9, RecordType::Aaaa).unwrap()[0].to_string(),
            "AAAA 2001:2:0:1::2"
        );
    }
}
