//! Object formats v1 and v2 (blob-format.md): round trips at the chunk-boundary sizes,
//! and one test per tampering the spec says a reader must reject.

use std::io::{Read, Write};

use backupy_agent::crypto::{self, DataKey, Encryption, Error, Identity, KeySource};

const C: usize = 4096;
const V1_FRAME: usize = 1 << 20;
/// Fixed v2 header length (raw key mode): magic 4, version, key mode, compression,
/// reserved, chunk size 4, salt 16, nonce prefix 7, K 2.
const H: usize = 37;
const TAG: usize = 16;

fn key(b: u8) -> DataKey {
    DataKey::from_bytes([b; 32])
}

/// Deterministic, non-repeating test bytes.
fn data(n: usize) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn seal(enc: &Encryption, plaintext: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let prepared = enc.prepare(0).unwrap();
    let dek = prepared.encrypted_dek.clone();
    let mut w = prepared.writer(Vec::new()).unwrap();
    // Uneven write sizes exercise the hold-back logic.
    for piece in plaintext.chunks(1000) {
        w.write_all(piece).unwrap();
    }
    (w.finish().unwrap(), dek)
}

fn open(obj: Vec<u8>, key: &KeySource) -> Result<Vec<u8>, std::io::Error> {
    let (_, mut r) = crypto::open(std::io::Cursor::new(obj), key)?;
    let mut out = Vec::new();
    r.read_to_end(&mut out)?;
    Ok(out)
}

fn crypto_err(r: Result<Vec<u8>, std::io::Error>) -> Error {
    let e = r.expect_err("tampered object must be rejected");
    match crypto::find_error(&e) {
        Some(c) => clone_err(c),
        None => panic!("expected a format error, got {e}"),
    }
}

fn clone_err(e: &Error) -> Error {
    match e {
        Error::BadHeader(s) => Error::BadHeader(s.clone()),
        Error::Truncated(s) => Error::Truncated(s.clone()),
        Error::Tampered { chunk } => Error::Tampered { chunk: *chunk },
        Error::WrongKey => Error::WrongKey,
        Error::WrongIdentity => Error::WrongIdentity,
        Error::TrailingData(s) => Error::TrailingData(s.clone()),
        Error::KeyMismatch(s) => Error::KeyMismatch(s.clone()),
        Error::BadKey { reason } => Error::BadKey { reason: reason.clone() },
        Error::Random(s) => Error::Random(s.clone()),
        Error::TooLarge(s) => Error::TooLarge(s.clone()),
    }
}

fn v2_raw() -> Encryption {
    Encryption::V2Raw { key: key(7), chunk_size: C as u32 }
}

#[test]
fn v2_raw_round_trips_at_chunk_boundaries() {
    for n in [0, 1, C - 1, C, C + 1, 3 * C, 3 * C + 5, 10 * C + 17] {
        let pt = data(n);
        let (obj, dek) = seal(&v2_raw(), &pt);
        assert_eq!(dek, key(7).as_bytes().to_vec(), "raw mode reports the raw key");
        let chunks = if n == 0 { 1 } else { n.div_ceil(C) };
        assert_eq!(obj.len(), H + n + chunks * TAG, "size {n}: header + plaintext + one tag per chunk");
        assert_eq!(open(obj, &KeySource::Raw(key(7))).unwrap(), pt, "size {n}");
    }
}

#[test]
fn v2_recipient_round_trips_at_chunk_boundaries() {
    let id = Identity::generate().unwrap();
    let recipient = id.recipient().unwrap();
    for n in [0, 1, C - 1, C, C + 1, 5 * C + 3] {
        let pt = data(n);
        let enc = Encryption::V2Recipient { recipient: recipient.clone(), chunk_size: C as u32 };
        let prepared = enc.prepare(1).unwrap();
        assert_eq!(prepared.encrypted_dek.len(), 80, "sealed key block is 80 bytes");
        assert!(prepared.key_id.starts_with("x25519:") && prepared.key_id.len() == 7 + 16);
        let (obj, _) = seal(&enc, &pt);
        assert_eq!(&obj[5..6], &[1], "key mode 1");
        assert_eq!(&obj[35..37], &[0, 80], "K = 80");
        assert_eq!(
            open(obj, &KeySource::Identity(Identity::parse(&id.to_file_text().unwrap()).unwrap())).unwrap(),
            pt
        );
    }
}

#[test]
fn v2_default_chunk_size_round_trips_several_chunks() {
    let pt = data(3 * (1 << 20) + 11);
    let enc = Encryption::V2Raw { key: key(1), chunk_size: crypto::v2::DEFAULT_CHUNK };
    let (obj, _) = seal(&enc, &pt);
    assert_eq!(u32::from_be_bytes(obj[8..12].try_into().unwrap()), 1 << 20);
    assert_eq!(open(obj, &KeySource::Raw(key(1))).unwrap(), pt);
}

#[test]
fn v1_round_trips_at_frame_boundaries() {
    for n in [0, 1, V1_FRAME - 1, V1_FRAME, V1_FRAME + 1, 2 * V1_FRAME + 7] {
        let pt = data(n);
        let (obj, _) = seal(&Encryption::V1 { key: key(3) }, &pt);
        let frames = n.div_ceil(V1_FRAME);
        assert_eq!(obj.len(), n + frames * (4 + 12 + TAG) + 4, "size {n}: frames plus end marker");
        assert_eq!(open(obj, &KeySource::Raw(key(3))).unwrap(), pt, "size {n}");
    }
}

#[test]
fn v1_empty_plaintext_is_the_end_marker_alone() {
    let (obj, _) = seal(&Encryption::V1 { key: key(3) }, b"");
    assert_eq!(obj, vec![0, 0, 0, 0]);
}

// --- v2 rejections -------------------------------------------------------------------

/// A raw-key v2 object of 3 full chunks and a 100-byte final chunk.
fn v2_object() -> Vec<u8> {
    seal(&v2_raw(), &data(3 * C + 100)).0
}

fn chunk_range(i: usize) -> std::ops::Range<usize> {
    let start = H + i * (C + TAG);
    start..start + C + TAG
}

fn open_v2(obj: Vec<u8>) -> Result<Vec<u8>, std::io::Error> {
    open(obj, &KeySource::Raw(key(7)))
}

#[test]
fn v2_rejects_flipped_bit_in_header_salt() {
    let mut obj = v2_object();
    obj[20] ^= 0x01;
    assert!(matches!(crypto_err(open_v2(obj)), Error::WrongKey));
}

#[test]
fn v2_rejects_flipped_bit_in_header_fields() {
    for (pos, what) in [(0, "magic"), (4, "version"), (5, "key mode"), (6, "compression"), (7, "reserved")] {
        let mut obj = v2_object();
        obj[pos] ^= 0x40;
        let e = open_v2(obj).expect_err(what);
        // A flipped magic makes it look like v1, which then fails on its frame length.
        assert!(crypto::find_error(&e).is_some(), "{what}: {e}");
    }
    let mut obj = v2_object();
    obj[8] ^= 0x01; // chunk size 0x01001000 → above 16 MiB
    assert!(matches!(crypto_err(open_v2(obj)), Error::BadHeader(_)));
}

#[test]
fn v2_rejects_flipped_bit_in_a_chunk() {
    let mut obj = v2_object();
    obj[chunk_range(1).start + 100] ^= 0x04;
    assert!(matches!(crypto_err(open_v2(obj)), Error::Tampered { chunk: 1 }));
}

#[test]
fn v2_rejects_flipped_bit_in_a_tag() {
    let mut obj = v2_object();
    obj[chunk_range(2).end - 3] ^= 0x80;
    assert!(matches!(crypto_err(open_v2(obj)), Error::Tampered { chunk: 2 }));
}

#[test]
fn v2_rejects_stream_cut_at_a_chunk_boundary() {
    let mut obj = v2_object();
    obj.truncate(chunk_range(2).end);
    assert!(matches!(crypto_err(open_v2(obj)), Error::Truncated(_)));
    let mut obj = v2_object();
    obj.truncate(H);
    assert!(matches!(crypto_err(open_v2(obj)), Error::Truncated(_)));
}

#[test]
fn v2_rejects_stream_cut_inside_a_chunk() {
    for cut in [chunk_range(1).start + 10, chunk_range(3).start + 50, chunk_range(0).start + 5] {
        let mut obj = v2_object();
        obj.truncate(cut);
        let e = crypto_err(open_v2(obj));
        assert!(
            matches!(e, Error::Truncated(_) | Error::Tampered { .. } | Error::WrongKey),
            "cut at {cut}: {e}"
        );
    }
}

#[test]
fn v2_rejects_a_dropped_chunk() {
    let mut obj = v2_object();
    obj.drain(chunk_range(1));
    assert!(matches!(crypto_err(open_v2(obj)), Error::Tampered { chunk: 1 }));
}

#[test]
fn v2_rejects_two_swapped_chunks() {
    let obj = v2_object();
    let mut swapped = obj[..chunk_range(1).start].to_vec();
    swapped.extend_from_slice(&obj[chunk_range(2)]);
    swapped.extend_from_slice(&obj[chunk_range(1)]);
    swapped.extend_from_slice(&obj[chunk_range(3).start..]);
    assert_eq!(swapped.len(), obj.len());
    assert!(matches!(crypto_err(open_v2(swapped)), Error::Tampered { chunk: 1 }));
}

#[test]
fn v2_rejects_a_duplicated_chunk() {
    let obj = v2_object();
    let mut dup = obj[..chunk_range(2).end].to_vec();
    dup.extend_from_slice(&obj[chunk_range(2)]);
    dup.extend_from_slice(&obj[chunk_range(3).start..]);
    assert!(matches!(crypto_err(open_v2(dup)), Error::Tampered { chunk: 3 }));
}

#[test]
fn v2_rejects_bytes_appended_after_the_final_chunk() {
    // Final chunk full: the reader sees the extra bytes as data after the final chunk.
    let mut obj = seal(&v2_raw(), &data(2 * C)).0;
    obj.extend_from_slice(b"extra");
    assert!(matches!(crypto_err(open_v2(obj)), Error::TrailingData(_)));
    // Final chunk short: the extra bytes become part of it and its tag fails.
    let mut obj = v2_object();
    obj.push(0);
    assert!(matches!(crypto_err(open_v2(obj)), Error::Tampered { chunk: 3 }));
}

#[test]
fn v2_rejects_a_wrong_key() {
    let obj = v2_object();
    assert!(matches!(crypto_err(open(obj, &KeySource::Raw(key(8)))), Error::WrongKey));
}

#[test]
fn v2_rejects_a_wrong_private_key() {
    let id = Identity::generate().unwrap();
    let enc = Encryption::V2Recipient { recipient: id.recipient().unwrap(), chunk_size: C as u32 };
    let (obj, _) = seal(&enc, &data(100));
    let other = Identity::generate().unwrap();
    assert!(matches!(crypto_err(open(obj, &KeySource::Identity(other))), Error::WrongIdentity));
}

#[test]
fn v2_rejects_key_kind_that_does_not_match_the_key_mode() {
    let id = Identity::generate().unwrap();
    let enc = Encryption::V2Recipient { recipient: id.recipient().unwrap(), chunk_size: C as u32 };
    let (sealed, _) = seal(&enc, &data(10));
    let e = crypto_err(open(sealed, &KeySource::Raw(key(1))));
    assert!(e.to_string().contains("--identity"), "{e}");
    let e = crypto_err(open(v2_object(), &KeySource::Identity(id)));
    assert!(matches!(e, Error::KeyMismatch(_)), "{e}");
}

/// Builds chunks independently from the spec text (HKDF-SHA256, counter nonces, header
/// hash as AAD), to craft an object the writer never produces.
fn craft_v2(chunks: &[(&[u8], bool)]) -> Vec<u8> {
    use aes_gcm::aead::{Aead, KeyInit, Payload};
    use sha2::Digest;
    let mut header = Vec::new();
    header.extend_from_slice(b"BKPY");
    header.extend_from_slice(&[2, 0, 0, 0]);
    header.extend_from_slice(&(C as u32).to_be_bytes());
    header.extend_from_slice(&[0x11; 16]); // salt
    header.extend_from_slice(&[0x22; 7]); // nonce prefix
    header.extend_from_slice(&[0, 0]);
    let hk = hkdf::Hkdf::<sha2::Sha256>::new(Some(&[0x11; 16]), key(7).as_bytes());
    let mut ck = [0u8; 32];
    hk.expand(b"backupy blob v2", &mut ck).unwrap();
    let aad = sha2::Sha256::digest(&header);
    let cipher = aes_gcm::Aes256Gcm::new(&ck.into());
    let mut obj = header.clone();
    for (i, (pt, last)) in chunks.iter().enumerate() {
        let mut nonce = [0u8; 12];
        nonce[..7].copy_from_slice(&[0x22; 7]);
        nonce[7..11].copy_from_slice(&(i as u32).to_be_bytes());
        nonce[11] = *last as u8;
        let ct = cipher.encrypt(&nonce.into(), Payload { msg: pt, aad: &aad }).unwrap();
        obj.extend_from_slice(&ct);
    }
    obj
}

#[test]
fn v2_reader_accepts_an_independently_built_object() {
    let a = data(C);
    let obj = craft_v2(&[(&a, false), (b"tail", true)]);
    let mut expected = a.clone();
    expected.extend_from_slice(b"tail");
    assert_eq!(open_v2(obj).unwrap(), expected);
}

#[test]
fn v2_rejects_an_empty_final_chunk_after_other_chunks() {
    let a = data(C);
    let obj = craft_v2(&[(&a, false), (b"", true)]);
    assert!(matches!(crypto_err(open_v2(obj)), Error::BadHeader(m) if m.contains("empty final chunk")));
}

#[test]
fn v2_rejects_a_stream_without_a_final_flag() {
    let a = data(C);
    let obj = craft_v2(&[(&a, false), (&a, false)]);
    assert!(matches!(crypto_err(open_v2(obj)), Error::Truncated(_)));
}

#[test]
fn v2_rejects_wrong_sealed_key_length_for_key_mode() {
    let mut obj = v2_object();
    obj[36] = 80; // K = 80 in key mode 0
    assert!(matches!(crypto_err(open_v2(obj)), Error::BadHeader(_)));
}

// --- v1 rejections -------------------------------------------------------------------

fn v1_object() -> Vec<u8> {
    seal(&Encryption::V1 { key: key(3) }, &data(V1_FRAME + 500)).0
}

fn open_v1(obj: Vec<u8>) -> Result<Vec<u8>, std::io::Error> {
    open(obj, &KeySource::Raw(key(3)))
}

#[test]
fn v1_rejects_flipped_bits() {
    let mut obj = v1_object();
    obj[4 + 12 + 1000] ^= 1; // inside frame 0's ciphertext
    assert!(matches!(crypto_err(open_v1(obj)), Error::WrongKey));
    let mut obj = v1_object();
    let second = 4 + 12 + V1_FRAME + TAG;
    obj[second + 4 + 12 + 3] ^= 1;
    assert!(matches!(crypto_err(open_v1(obj)), Error::Tampered { chunk: 1 }));
}

#[test]
fn v1_rejects_a_missing_end_marker() {
    let mut obj = v1_object();
    obj.truncate(obj.len() - 4);
    assert!(matches!(crypto_err(open_v1(obj)), Error::Truncated(_)));
}

#[test]
fn v1_rejects_bad_frame_lengths() {
    for l in [1u32, 27, 1_048_605, u32::MAX] {
        let mut obj = v1_object();
        obj[..4].copy_from_slice(&l.to_be_bytes());
        assert!(matches!(crypto_err(open_v1(obj)), Error::BadHeader(_)), "L = {l}");
    }
}

#[test]
fn v1_rejects_bytes_after_the_end_marker() {
    let mut obj = v1_object();
    obj.push(0);
    assert!(matches!(crypto_err(open_v1(obj)), Error::TrailingData(_)));
}

#[test]
fn v1_rejects_a_cut_frame() {
    let mut obj = v1_object();
    obj.truncate(4 + 12 + 500);
    assert!(matches!(crypto_err(open_v1(obj)), Error::Truncated(_)));
}

#[test]
fn v1_rejects_a_wrong_key() {
    assert!(matches!(crypto_err(open(v1_object(), &KeySource::Raw(key(4)))), Error::WrongKey));
}

// --- keys ----------------------------------------------------------------------------

#[test]
fn identity_file_accepts_comments_crlf_and_missing_final_newline() {
    let id = Identity::generate().unwrap();
    let text = id.to_file_text().unwrap();
    let line = text.lines().find(|l| l.starts_with("BKPY-SECRET-KEY-1:")).unwrap();
    let variant = format!("\r\n# comment\r\n\r\n   {line}  ");
    let again = Identity::parse(&variant).unwrap();
    assert_eq!(again.recipient().unwrap(), id.recipient().unwrap());
}

#[test]
fn recipient_string_is_bkpy1_and_57_lowercase_chars() {
    let r = Identity::generate().unwrap().recipient().unwrap();
    let s = r.to_string();
    assert_eq!(s.len(), 57);
    assert!(s.starts_with("bkpy1"));
    assert_eq!(s, s.to_ascii_lowercase());
    assert_eq!(crypto::Recipient::parse(&s).unwrap(), r);
    assert!(crypto::Recipient::parse(&s.to_ascii_uppercase()).is_err());
    assert!(crypto::Recipient::parse("bkpy1abc").is_err());
}

#[test]
fn recipient_key_id_is_sha256_prefix_of_the_public_key() {
    // The shared vectors' recipient and its dek_kms_id, from the independent implementation.
    let r = crypto::Recipient::parse("bkpy1eudvnifsjvjtk4d2ckf6wtu5zu6aws7ucqxbnjl656asn72r3eua").unwrap();
    assert_eq!(r.key_id(), "x25519:4402cca154a29bcd");
}

#[test]
fn raw_key_file_accepts_hex_and_base64_with_whitespace() {
    let hex = format!("  {}\n", "ab".repeat(32));
    assert_eq!(crypto::keys::parse_raw_key(&hex).unwrap(), DataKey::from_bytes([0xab; 32]));
    let b64 = "\n q6urq6urq6urq6urq6urq6urq6urq6urq6urq6urq6s= \n";
    assert_eq!(crypto::keys::parse_raw_key(b64).unwrap(), DataKey::from_bytes([0xab; 32]));
    assert!(crypto::keys::parse_raw_key("abcd").is_err());
    assert!(crypto::keys::parse_raw_key(&"ab".repeat(31)).is_err());
}
