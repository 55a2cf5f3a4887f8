/**
 * The few DER operations module signing needs: reading TLVs as byte spans of the input (so that a
 * certificate's issuer Name and serial number are copied byte for byte, as OpenSSL copies them
 * from its cached encoding) and writing definite-length TLVs.
 */

export class DerError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'DerError';
  }
}

/** Universal tags used here; context-specific tags are written as `0xa0 | n` (constructed). */
export const Tag = {
  INTEGER: 0x02,
  BIT_STRING: 0x03,
  OCTET_STRING: 0x04,
  NULL: 0x05,
  OID: 0x06,
  UTF8_STRING: 0x0c,
  SEQUENCE: 0x30,
  SET: 0x31,
} as const;

/** One TLV inside a buffer: `tag`, its content `[start, end)` and the whole encoding `[offset, end)`. */
export interface Tlv {
  readonly tag: number;
  readonly offset: number;
  readonly start: number;
  readonly end: number;
}

/** The TLV at `offset`, within `limit` (default: the buffer's end). Single-byte tags only. */
export function readTlv(buf: Buffer, offset: number, limit = buf.length): Tlv {
  if (offset + 2 > limit) throw new DerError('truncated DER element');
  const tag = buf[offset]!;
  if ((tag & 0x1f) === 0x1f) throw new DerError('multi-byte DER tags are not supported');
  let len = buf[offset + 1]!;
  let start = offset + 2;
  if (len === 0x80) throw new DerError('indefinite lengths are not DER');
  if (len > 0x80) {
    const n = len & 0x7f;
    if (n > 4 || start + n > limit) throw new DerError('bad DER length');
    len = 0;
    for (let i = 0; i < n; i++) len = len * 256 + buf[start + i]!;
    start += n;
  }
  const end = start + len;
  if (end > limit) throw new DerError('DER element runs past its container');
  return { tag, offset, start, end };
}

/** The elements of a constructed TLV, in order. */
export function children(buf: Buffer, parent: Tlv): Tlv[] {
  const out: Tlv[] = [];
  for (let pos = parent.start; pos < parent.end; ) {
    const t = readTlv(buf, pos, parent.end);
    out.push(t);
    pos = t.end;
  }
  return out;
}

/** Reads `buf` as exactly one TLV with `tag`. */
export function readWhole(buf: Buffer, tag: number, what: string): Tlv {
  const t = readTlv(buf, 0);
  if (t.tag !== tag || t.end !== buf.length) throw new DerError(`${what} is not one DER element`);
  return t;
}

export function expectTag(t: Tlv | undefined, tag: number, what: string): Tlv {
  if (!t || t.tag !== tag) throw new DerError(`${what}: expected tag 0x${tag.toString(16)}, found ${t ? `0x${t.tag.toString(16)}` : 'nothing'}`);
  return t;
}

export const bytes = (buf: Buffer, t: Tlv): Buffer => buf.subarray(t.offset, t.end);
export const content = (buf: Buffer, t: Tlv): Buffer => buf.subarray(t.start, t.end);

function lengthBytes(n: number): Buffer {
  if (n < 0x80) return Buffer.from([n]);
  const out: number[] = [];
  for (let v = n; v > 0; v = Math.floor(v / 256)) out.unshift(v & 0xff);
  return Buffer.from([0x80 | out.length, ...out]);
}

/** A TLV of `tag` around the concatenation of `parts`. */
export function tlv(tag: number, ...parts: readonly Buffer[]): Buffer {
  const body = Buffer.concat(parts);
  return Buffer.concat([Buffer.from([tag]), lengthBytes(body.length), body]);
}

export const sequence = (...parts: readonly Buffer[]): Buffer => tlv(Tag.SEQUENCE, ...parts);
export const set = (...parts: readonly Buffer[]): Buffer => tlv(Tag.SET, ...parts);
export const NULL = Buffer.from([Tag.NULL, 0]);

/** A small non-negative INTEGER (versions). */
export function smallInteger(n: number): Buffer {
  if (!Number.isInteger(n) || n < 0 || n > 0x7f) throw new DerError(`not a small integer: ${n}`);
  return Buffer.from([Tag.INTEGER, 1, n]);
}

/** The DER of a dotted OID. */
export function oid(dotted: string): Buffer {
  const arcs = dotted.split('.').map((a) => BigInt(a));
  if (arcs.length < 2) throw new DerError(`bad OID ${dotted}`);
  const body: number[] = [];
  const push = (v: bigint): void => {
    const b: number[] = [Number(v & 0x7fn)];
    for (v >>= 7n; v > 0n; v >>= 7n) b.unshift(Number(v & 0x7fn) | 0x80);
    body.push(...b);
  };
  push(arcs[0]! * 40n + arcs[1]!);
  for (const a of arcs.slice(2)) push(a);
  return tlv(Tag.OID, Buffer.from(body));
}

/** The dotted form of an OID element's content. */
export function oidToString(value: Buffer): string {
  const arcs: bigint[] = [];
  let v = 0n;
  for (const b of value) {
    v = (v << 7n) | BigInt(b & 0x7f);
    if ((b & 0x80) === 0) {
      if (arcs.length === 0) {
        const first = v < 80n ? v / 40n : 2n;
        arcs.push(first, v - first * 40n);
      } else {
        arcs.push(v);
      }
      v = 0n;
    }
  }
  return arcs.join('.');
}
