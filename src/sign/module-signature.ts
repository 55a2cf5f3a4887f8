/**
 * Linux kernel module signing in process, byte for byte what Debian's `sign-file` (linux-kbuild,
 * OpenSSL 3 CMS path) appends, and verification of such signatures.
 *
 * A signed module is `module ‖ CMS ContentInfo (DER) ‖ struct module_signature ‖
 * "~Module signature appended~\n"`. The CMS is a detached SignedData without certificates and
 * without signed attributes: the signature is over the module bytes themselves. Its SignerInfo
 * names the certificate by issuer and serial number. RSA keys sign with PKCS#1 v1.5, which is
 * deterministic, so the output equals sign-file's exactly; ECDSA signatures are randomised.
 *
 * The event loop is never held for long: the module is hashed 1 MiB at a time with a turn of the
 * event loop between slices, the RSA operation is on the 32-64 byte DigestInfo (`privateEncrypt`,
 * which is PKCS#1 v1.5 signing), and the output is assembled 1 MiB at a time. ECDSA cannot sign a
 * precomputed digest through Node's API, so EC keys sign in libuv's thread pool (`crypto.sign`
 * with a callback), which costs one copy of the module on the main thread. Decompression and
 * compression are asynchronous. See docs/adr/0010-module-signing.md.
 */
import {
  X509Certificate,
  createHash,
  createPrivateKey,
  createPublicKey,
  privateEncrypt,
  publicDecrypt,
  sign as cryptoSign,
  verify as cryptoVerify,
  type KeyObject,
} from 'node:crypto';
import { setImmediate as yieldToLoop } from 'node:timers/promises';
import { promisify } from 'node:util';
import zlib from 'node:zlib';
import { decompressModule, ModinfoError, moduleCompression } from '../engine/modinfo.ts';
import {
  bytes,
  children,
  content,
  DerError,
  expectTag,
  NULL,
  oid,
  oidToString,
  readWhole,
  sequence,
  set,
  smallInteger,
  Tag,
  tlv,
  type Tlv,
} from './der.ts';
import { xzStore } from './xz-container.ts';

const zstdCompress = promisify(zlib.zstdCompress);
const gzip = promisify(zlib.gzip);

export type SignHashAlgorithm = 'sha1' | 'sha224' | 'sha256' | 'sha384' | 'sha512';

export type SigningKeyErrorCode = 'InvalidKey' | 'InvalidCertificate' | 'KeyMismatch' | 'UnsupportedKey';

/** A signing key or certificate that cannot be used. The message never holds key material. */
export class SigningKeyError extends Error {
  readonly code: SigningKeyErrorCode;
  constructor(code: SigningKeyErrorCode, message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = 'SigningKeyError';
    this.code = code;
  }
}

export type ModuleSignatureErrorCode = 'NotSigned' | 'InvalidSignature' | 'BadSignature' | 'WrongSigner' | 'UnsupportedSignature';

/**
 * - `NotSigned`: no `~Module signature appended~` trailer.
 * - `InvalidSignature`: a trailer or CMS structure that does not parse.
 * - `BadSignature`: well-formed, from the certificate's key id, but the cryptographic check fails
 *   (the module or the signature was changed).
 * - `WrongSigner`: signed by another certificate.
 * - `UnsupportedSignature`: a pre-PKCS#7 trailer, an unknown digest or signature algorithm, an
 *   attached (non-detached) CMS.
 */
export class ModuleSignatureError extends Error {
  readonly code: ModuleSignatureErrorCode;
  constructor(code: ModuleSignatureErrorCode, message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = 'ModuleSignatureError';
    this.code = code;
  }
}

export interface ModuleSigner {
  readonly hashAlgorithm: SignHashAlgorithm;
  /** What modinfo shows as `signer`. */
  readonly signer: string;
  /** What modinfo shows as `sig_key` (e.g. upper-case hex bytes joined by ':'). */
  readonly keyId: string;
  /** Signs an uncompressed module (ELF); an existing signature is replaced. */
  sign(module: Buffer, signal?: AbortSignal): Promise<Buffer>;
}

export interface VerifiedSignature {
  readonly signer: string;
  readonly keyId: string;
  readonly hashAlgorithm: string;
}

// ---------------------------------------------------------------------------------------------
// Constants

const MAGIC = Buffer.from('~Module signature appended~\n');
/** `struct module_signature`: algo, hash, id_type, signer_len, key_id_len, pad[3], be32 sig_len. */
const INFO_LEN = 12;
const PKEY_ID_PKCS7 = 2;

const OID = {
  signedData: '1.2.840.113549.1.7.2',
  data: '1.2.840.113549.1.7.1',
  messageDigest: '1.2.840.113549.1.9.4',
  rsaEncryption: '1.2.840.113549.1.1.1',
  ecPublicKey: '1.2.840.10045.2.1',
  commonName: '2.5.4.3',
  subjectKeyIdentifier: '2.5.29.14',
} as const;

interface HashInfo {
  readonly oid: string;
  readonly ecdsaOid: string;
  /** `sha*WithRSAEncryption`, accepted when verifying (OpenSSL writes rsaEncryption). */
  readonly rsaOid: string;
  /** The DER DigestInfo up to the digest value (EMSA-PKCS1-v1_5, RFC 8017 9.2 note 1). */
  readonly digestInfoPrefix: Buffer;
}

const hashInfo = (digestOid: string, ecdsaOid: string, rsaOid: string, digestLength: number): HashInfo => {
  const digestInfo = sequence(sequence(oid(digestOid), NULL), tlv(Tag.OCTET_STRING, Buffer.alloc(digestLength)));
  return { oid: digestOid, ecdsaOid, rsaOid, digestInfoPrefix: digestInfo.subarray(0, digestInfo.length - digestLength) };
};

const HASHES: Readonly<Record<SignHashAlgorithm, HashInfo>> = {
  sha1: hashInfo('1.3.14.3.2.26', '1.2.840.10045.4.1', '1.2.840.113549.1.1.5', 20),
  sha224: hashInfo('2.16.840.1.101.3.4.2.4', '1.2.840.10045.4.3.1', '1.2.840.113549.1.1.14', 28),
  sha256: hashInfo('2.16.840.1.101.3.4.2.1', '1.2.840.10045.4.3.2', '1.2.840.113549.1.1.11', 32),
  sha384: hashInfo('2.16.840.1.101.3.4.2.2', '1.2.840.10045.4.3.3', '1.2.840.113549.1.1.12', 48),
  sha512: hashInfo('2.16.840.1.101.3.4.2.3', '1.2.840.10045.4.3.4', '1.2.840.113549.1.1.13', 64),
};

const HASH_BY_OID = new Map(Object.entries(HASHES).map(([name, h]) => [h.oid, name as SignHashAlgorithm]));

/** The curves the kernel verifies module signatures with (6.1: NIST P-256 and P-384). */
const EC_CURVES = new Set(['prime256v1', 'secp384r1']);

// ---------------------------------------------------------------------------------------------
// Certificates and keys

interface ParsedCertificate {
  readonly x509: X509Certificate;
  /** The issuer Name's DER, as in the certificate. */
  readonly issuer: Buffer;
  /** The serial number INTEGER's DER, as in the certificate. */
  readonly serial: Buffer;
  readonly subjectKeyIdentifier?: Buffer;
  /** kmod's reading of the issuer: the CN (see {@link signerName}). */
  readonly signer: string;
  /** The serial as modinfo prints it. */
  readonly keyId: string;
}

const isPem = (b: Buffer | string): boolean => (typeof b === 'string' ? b : b.toString('latin1', 0, Math.min(b.length, 64 * 1024))).includes('-----BEGIN');

/** Upper-case hex bytes joined by ':' (modinfo's `sig_key`). */
function colonHex(b: Buffer): string {
  return [...b].map((x) => x.toString(16).toUpperCase().padStart(2, '0')).join(':');
}

/** An INTEGER's content as an unsigned big-endian number without leading zeros (OpenSSL's BN_bn2bin). */
function unsignedMagnitude(value: Buffer): Buffer {
  let i = 0;
  while (i < value.length && value[i] === 0) i++;
  return value.subarray(i);
}

/**
 * What kmod prints as `signer` for an issuer Name: the value of the first commonName attribute,
 * else (kmod's loop leaves its variables at the last entry) the value of the last attribute.
 */
function signerName(der: Buffer, name: Tlv): string {
  let last: string | undefined;
  for (const rdn of children(der, name)) {
    for (const atv of children(der, rdn)) {
      const [type, value] = children(der, atv);
      if (!type || !value) continue;
      const text = content(der, value).toString('utf8');
      if (oidToString(content(der, type)) === OID.commonName) return text;
      last = text;
    }
  }
  return last ?? '';
}

function parseCertificate(certificate: Buffer | string): ParsedCertificate {
  let x509: X509Certificate;
  try {
    x509 = new X509Certificate(certificate);
  } catch (err) {
    const form = isPem(certificate) ? 'PEM' : 'DER';
    throw new SigningKeyError('InvalidCertificate', `the certificate is not a valid X.509 certificate (read as ${form}): ${(err as Error).message}`, { cause: err });
  }
  const der = x509.raw;
  try {
    const cert = readWhole(der, Tag.SEQUENCE, 'certificate');
    const tbs = expectTag(children(der, cert)[0], Tag.SEQUENCE, 'tbsCertificate');
    const fields = children(der, tbs);
    let i = fields[0]?.tag === 0xa0 ? 1 : 0; // [0] version
    const serial = expectTag(fields[i++], Tag.INTEGER, 'serialNumber');
    i++; // signature
    const issuer = expectTag(fields[i++], Tag.SEQUENCE, 'issuer');
    let subjectKeyIdentifier: Buffer | undefined;
    const extensions = fields.find((f) => f.tag === 0xa3);
    if (extensions) {
      for (const ext of children(der, expectTag(children(der, extensions)[0], Tag.SEQUENCE, 'extensions'))) {
        const parts = children(der, ext);
        if (oidToString(content(der, expectTag(parts[0], Tag.OID, 'extnID'))) !== OID.subjectKeyIdentifier) continue;
        const value = expectTag(parts[parts.length - 1], Tag.OCTET_STRING, 'extnValue');
        const inner = content(der, value);
        subjectKeyIdentifier = content(inner, readWhole(inner, Tag.OCTET_STRING, 'subjectKeyIdentifier'));
      }
    }
    return {
      x509,
      issuer: bytes(der, issuer),
      serial: bytes(der, serial),
      ...(subjectKeyIdentifier ? { subjectKeyIdentifier } : {}),
      signer: signerName(der, issuer),
      keyId: colonHex(unsignedMagnitude(content(der, serial))),
    };
  } catch (err) {
    throw new SigningKeyError('InvalidCertificate', `the certificate's DER could not be read: ${(err as Error).message}`, { cause: err });
  }
}

function loadPrivateKey(key: Buffer | string): KeyObject {
  const attempts: Parameters<typeof createPrivateKey>[0][] = isPem(key)
    ? [key]
    : (['pkcs8', 'pkcs1', 'sec1'] as const).map((type) => ({ key: key as Buffer, format: 'der' as const, type }));
  const text = typeof key === 'string' ? key : key.toString('latin1', 0, Math.min(key.length, 64 * 1024));
  if (/-----BEGIN ENCRYPTED PRIVATE KEY-----|Proc-Type: 4,ENCRYPTED/.test(text)) {
    throw new SigningKeyError('InvalidKey', 'the signing key is encrypted: a passphrase-protected key is not supported (decrypt it with openssl pkey)');
  }
  let first: unknown;
  for (const attempt of attempts) {
    try {
      return createPrivateKey(attempt);
    } catch (err) {
      first ??= err;
    }
  }
  throw new SigningKeyError('InvalidKey', `the signing key is not a valid private key (PEM or DER; PKCS#1, PKCS#8 or SEC1): ${(first as Error).message}`, { cause: first });
}

/** "2048-bit RSA key (…)" or "EC prime256v1 key (…)" with a short fingerprint of the public key, for messages. */
function describeKey(key: KeyObject): string {
  const publicKey = key.type === 'private' ? createPublicKey(key) : key;
  const d = publicKey.asymmetricKeyDetails ?? {};
  const kind = publicKey.asymmetricKeyType ?? 'unknown';
  const size = kind === 'rsa' || kind === 'rsa-pss' ? `${d.modulusLength}-bit ` : '';
  const curve = d.namedCurve ? ` ${d.namedCurve}` : '';
  const spki = publicKey.export({ type: 'spki', format: 'der' });
  const fp = colonHex(createHash('sha256').update(spki).digest().subarray(0, 8));
  return `${size}${kind.toUpperCase()}${curve} key (public key SHA-256 ${fp}…)`;
}

function checkSupported(key: KeyObject, what: string): void {
  const type = key.asymmetricKeyType;
  if (type === 'rsa') return;
  if (type === 'ec' && EC_CURVES.has(key.asymmetricKeyDetails?.namedCurve ?? '')) return;
  throw new SigningKeyError(
    'UnsupportedKey',
    `${what} is an unsupported ${describeKey(key)}: kernel module signatures take RSA (PKCS#1 v1.5) or ECDSA with NIST P-256 or P-384 keys`,
  );
}

// ---------------------------------------------------------------------------------------------
// Work in slices: at most 1 MiB of hashing or copying between two turns of the event loop

const SLICE = 1024 * 1024;

/** A digest of `data` computed 1 MiB at a time, yielding to the event loop in between. */
async function digestInSlices(hash: SignHashAlgorithm, data: Buffer, signal?: AbortSignal): Promise<Buffer> {
  const h = createHash(hash);
  for (let off = 0; off < data.length; off += SLICE) {
    h.update(data.subarray(off, off + SLICE));
    if (off + SLICE < data.length) {
      await yieldToLoop();
      signal?.throwIfAborted();
    }
  }
  return h.digest();
}

/** `Buffer.concat(parts)`, copying 1 MiB at a time. */
async function concatInSlices(parts: readonly Buffer[], signal?: AbortSignal): Promise<Buffer> {
  const out = Buffer.allocUnsafe(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  let sinceYield = 0;
  for (const part of parts) {
    for (let off = 0; off < part.length; off += SLICE) {
      const piece = part.subarray(off, off + SLICE);
      out.set(piece, at);
      at += piece.length;
      sinceYield += piece.length;
      if (sinceYield >= SLICE && at < out.length) {
        sinceYield = 0;
        await yieldToLoop();
        signal?.throwIfAborted();
      }
    }
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Signing

/**
 * An RSA PKCS#1 v1.5 signature of `data`: the digest computed in slices, then the private-key
 * operation on the DigestInfo, which is exactly what `crypto.sign(hash, data, rsaKey)` produces.
 */
async function rsaSign(hash: SignHashAlgorithm, data: Buffer, key: KeyObject, signal?: AbortSignal): Promise<Buffer> {
  const digest = await digestInSlices(hash, data, signal);
  return privateEncrypt(key, Buffer.concat([HASHES[hash].digestInfoPrefix, digest]));
}

/** Whether `signature` is the RSA PKCS#1 v1.5 signature of `data` under `key`. */
async function rsaVerify(hash: SignHashAlgorithm, data: Buffer, key: KeyObject, signature: Buffer, signal?: AbortSignal): Promise<boolean> {
  const expected = Buffer.concat([HASHES[hash].digestInfoPrefix, await digestInSlices(hash, data, signal)]);
  let recovered: Buffer;
  try {
    recovered = publicDecrypt(key, signature);
  } catch {
    return false; // not a PKCS#1 type 1 block under this key
  }
  return recovered.equals(expected);
}

/** The thread-pool form of `crypto.sign` (ECDSA); an abort rejects at once (the pool job finishes unseen). */
function signInPool(hash: SignHashAlgorithm, data: Buffer, key: KeyObject, signal?: AbortSignal): Promise<Buffer> {
  return inPool<Buffer>((done) => cryptoSign(hash, data, key, done), signal);
}

function inPool<T>(start: (done: (err: Error | null, value: T) => void) => void, signal?: AbortSignal): Promise<T> {
  if (signal?.aborted) return Promise.reject(signal.reason as Error);
  return new Promise<T>((resolve, reject) => {
    const onAbort = (): void => reject(signal!.reason as Error);
    signal?.addEventListener('abort', onAbort, { once: true });
    start((err, value) => {
      signal?.removeEventListener('abort', onAbort);
      if (err) reject(err);
      else resolve(value);
    });
  });
}

function signatureTrailer(cms: Buffer): Buffer {
  const info = Buffer.alloc(INFO_LEN);
  info[2] = PKEY_ID_PKCS7;
  info.writeUInt32BE(cms.length, 8);
  return Buffer.concat([info, MAGIC]);
}

function requireElf(module: Buffer): void {
  if (module.length < 16 || module.readUInt32BE(0) !== 0x7f454c46) {
    throw new ModinfoError('it is not an ELF file (decompress a .ko.xz/.ko.zst/.ko.gz first, or use signModuleFile)');
  }
}

class CmsModuleSigner implements ModuleSigner {
  readonly hashAlgorithm: SignHashAlgorithm;
  readonly signer: string;
  readonly keyId: string;
  readonly #key: KeyObject;
  /** Everything of the CMS before the signature value, by part (see {@link buildCms}). */
  readonly #signerIdentifier: Buffer;
  readonly #signatureAlgorithm: Buffer;

  constructor(key: KeyObject, cert: ParsedCertificate, hashAlgorithm: SignHashAlgorithm) {
    this.hashAlgorithm = hashAlgorithm;
    this.signer = cert.signer;
    this.keyId = cert.keyId;
    this.#key = key;
    this.#signerIdentifier = sequence(cert.issuer, cert.serial);
    // OpenSSL's CMS writes rsaEncryption with NULL parameters for PKCS#1 v1.5, ecdsa-with-SHAx
    // without parameters for ECDSA.
    this.#signatureAlgorithm =
      key.asymmetricKeyType === 'rsa' ? sequence(oid(OID.rsaEncryption), NULL) : sequence(oid(HASHES[hashAlgorithm].ecdsaOid));
  }

  async sign(module: Buffer, signal?: AbortSignal): Promise<Buffer> {
    signal?.throwIfAborted();
    const unsigned = stripSignatures(module);
    requireElf(unsigned);
    const signature =
      this.#key.asymmetricKeyType === 'rsa'
        ? await rsaSign(this.hashAlgorithm, unsigned, this.#key, signal)
        : await signInPool(this.hashAlgorithm, unsigned, this.#key, signal);
    signal?.throwIfAborted();
    const cms = this.#buildCms(signature);
    return concatInSlices([unsigned, cms, signatureTrailer(cms)], signal);
  }

  /**
   * ContentInfo { signedData, [0] SignedData { 1, {digestAlg}, {data}, {SignerInfo { 1,
   * issuerAndSerialNumber, digestAlg, signatureAlg, signature }} } }: OpenSSL's CMS_sign with
   * CMS_NOCERTS | CMS_DETACHED | CMS_BINARY and CMS_NOATTR. The digest AlgorithmIdentifiers have
   * absent parameters, as OpenSSL 3 writes them.
   */
  #buildCms(signature: Buffer): Buffer {
    const digestAlgorithm = sequence(oid(HASHES[this.hashAlgorithm].oid));
    const signerInfo = sequence(
      smallInteger(1),
      this.#signerIdentifier,
      digestAlgorithm,
      this.#signatureAlgorithm,
      tlv(Tag.OCTET_STRING, signature),
    );
    const signedData = sequence(smallInteger(1), set(digestAlgorithm), sequence(oid(OID.data)), set(signerInfo));
    return sequence(oid(OID.signedData), tlv(0xa0, signedData));
  }
}

/**
 * A signer for `key` and `certificate`.
 * @param key PEM private key (PKCS#1, PKCS#8 or SEC1; RSA or EC P-256/P-384), or the same in DER.
 *   A PEM file holding the key and the certificate (the kernel's `signing_key.pem`) works for both.
 * @param certificate PEM or DER X.509 certificate of the key.
 * @throws SigningKeyError `InvalidKey`, `InvalidCertificate`, `KeyMismatch` (naming both keys) or
 *   `UnsupportedKey`.
 */
export function createModuleSigner(key: Buffer | string, certificate: Buffer | string, hashAlgorithm: SignHashAlgorithm = 'sha256'): ModuleSigner {
  if (!Object.hasOwn(HASHES, hashAlgorithm)) {
    throw new SigningKeyError('UnsupportedKey', `unsupported hash algorithm "${String(hashAlgorithm)}": use one of ${Object.keys(HASHES).join(', ')}`);
  }
  const cert = parseCertificate(certificate);
  const privateKey = loadPrivateKey(key);
  checkSupported(privateKey, 'the signing key');
  checkSupported(cert.x509.publicKey, `the certificate's key`);
  if (!cert.x509.checkPrivateKey(privateKey)) {
    throw new SigningKeyError(
      'KeyMismatch',
      `the signing key does not match the certificate: the signing key is a ${describeKey(privateKey)}; ` +
        `the certificate "${cert.x509.subject.replaceAll('\n', ', ')}" (serial ${cert.keyId}) holds a ${describeKey(cert.x509.publicKey)}`,
    );
  }
  return new CmsModuleSigner(privateKey, cert, hashAlgorithm);
}

// ---------------------------------------------------------------------------------------------
// Splitting

/**
 * Splits off a trailing PKCS#7 signature (CMS ‖ module_signature ‖ marker); `signature` (the CMS
 * DER) is undefined when the module is unsigned. Splits one signature, as the kernel does.
 * @throws ModuleSignatureError `UnsupportedSignature` for a pre-PKCS#7 trailer, `InvalidSignature`
 *   for a trailer whose length does not fit.
 */
export function splitModuleSignature(module: Buffer): { content: Buffer; signature?: Buffer } {
  if (module.length < MAGIC.length || !module.subarray(module.length - MAGIC.length).equals(MAGIC)) return { content: module };
  const info = module.length - MAGIC.length - INFO_LEN;
  if (info < 0) throw new ModuleSignatureError('InvalidSignature', 'the module signature trailer is truncated');
  const idType = module[info + 2]!;
  if (idType !== PKEY_ID_PKCS7) {
    throw new ModuleSignatureError('UnsupportedSignature', `the module has a signature of id type ${idType}, not PKCS#7 (2): an old format the kernel no longer reads`);
  }
  const sigLength = module.readUInt32BE(info + 8);
  if (sigLength === 0 || sigLength > info) {
    throw new ModuleSignatureError('InvalidSignature', `the module signature trailer states ${sigLength} bytes of signature, but ${info} bytes precede it`);
  }
  return { content: module.subarray(0, info - sigLength), signature: module.subarray(info - sigLength, info) };
}

/** The module without any appended signature (sign-file run twice leaves two). */
function stripSignatures(module: Buffer): Buffer {
  let current = module;
  for (;;) {
    const split = splitModuleSignature(current);
    if (!split.signature) return current;
    current = split.content;
  }
}

// ---------------------------------------------------------------------------------------------
// Verification

interface SignerInfo {
  readonly sid: { readonly kind: 'issuerAndSerial'; readonly issuer: Buffer; readonly serial: Buffer; readonly signer: string; readonly keyId: string } | { readonly kind: 'keyId'; readonly keyId: Buffer };
  readonly hash: SignHashAlgorithm;
  readonly signatureAlgorithm: string;
  /** The signed attributes re-tagged as a SET (what is signed), and the messageDigest value. */
  readonly signedAttributes?: { readonly der: Buffer; readonly messageDigest: Buffer };
  readonly signature: Buffer;
}

function parseCms(cms: Buffer): SignerInfo[] {
  const ci = children(cms, readWhole(cms, Tag.SEQUENCE, 'ContentInfo'));
  if (oidToString(content(cms, expectTag(ci[0], Tag.OID, 'contentType'))) !== OID.signedData) {
    throw new ModuleSignatureError('UnsupportedSignature', 'the module signature is not a CMS SignedData');
  }
  const sd = children(cms, expectTag(children(cms, expectTag(ci[1], 0xa0, 'content'))[0], Tag.SEQUENCE, 'SignedData'));
  const encap = children(cms, expectTag(sd[2], Tag.SEQUENCE, 'encapContentInfo'));
  if (oidToString(content(cms, expectTag(encap[0], Tag.OID, 'eContentType'))) !== OID.data || encap.length > 1) {
    throw new ModuleSignatureError('UnsupportedSignature', 'the module signature is not a detached signature of data (the kernel requires one)');
  }
  const signerInfos = sd[sd.length - 1];
  expectTag(signerInfos, Tag.SET, 'signerInfos');
  return children(cms, signerInfos!).map((si) => parseSignerInfo(cms, si));
}

function parseSignerInfo(cms: Buffer, si: Tlv): SignerInfo {
  const f = children(cms, expectTag(si, Tag.SEQUENCE, 'SignerInfo'));
  let i = 1; // version
  const sidTlv = f[i++];
  let sid: SignerInfo['sid'];
  if (sidTlv?.tag === Tag.SEQUENCE) {
    const [issuer, serial] = children(cms, sidTlv);
    expectTag(issuer, Tag.SEQUENCE, 'issuer');
    expectTag(serial, Tag.INTEGER, 'serialNumber');
    sid = {
      kind: 'issuerAndSerial',
      issuer: bytes(cms, issuer!),
      serial: bytes(cms, serial!),
      signer: signerName(cms, issuer!),
      keyId: colonHex(unsignedMagnitude(content(cms, serial!))),
    };
  } else if (sidTlv?.tag === 0x80) {
    sid = { kind: 'keyId', keyId: content(cms, sidTlv) };
  } else {
    throw new DerError('SignerInfo: bad signer identifier');
  }
  const digestOid = oidToString(content(cms, expectTag(children(cms, expectTag(f[i++], Tag.SEQUENCE, 'digestAlgorithm'))[0], Tag.OID, 'digest OID')));
  const hash = HASH_BY_OID.get(digestOid);
  if (!hash) throw new ModuleSignatureError('UnsupportedSignature', `the module signature uses digest algorithm ${digestOid}, not SHA-1 or SHA-2`);
  let signedAttributes: SignerInfo['signedAttributes'];
  if (f[i]?.tag === 0xa0) {
    const attrs = f[i++]!;
    let messageDigest: Buffer | undefined;
    for (const attr of children(cms, attrs)) {
      const [type, values] = children(cms, attr);
      if (oidToString(content(cms, expectTag(type, Tag.OID, 'attrType'))) !== OID.messageDigest) continue;
      messageDigest = content(cms, expectTag(children(cms, expectTag(values, Tag.SET, 'attrValues'))[0], Tag.OCTET_STRING, 'messageDigest'));
    }
    if (!messageDigest) throw new ModuleSignatureError('InvalidSignature', 'the module signature has signed attributes without a messageDigest');
    const der = Buffer.from(bytes(cms, attrs));
    der[0] = Tag.SET; // signed as a SET OF, stored as [0] IMPLICIT
    signedAttributes = { der, messageDigest };
  }
  const signatureAlgorithm = oidToString(content(cms, expectTag(children(cms, expectTag(f[i++], Tag.SEQUENCE, 'signatureAlgorithm'))[0], Tag.OID, 'signature OID')));
  const signature = content(cms, expectTag(f[i++], Tag.OCTET_STRING, 'signature'));
  return { sid, hash, signatureAlgorithm, ...(signedAttributes ? { signedAttributes } : {}), signature };
}

function sidMatches(sid: SignerInfo['sid'], cert: ParsedCertificate): boolean {
  if (sid.kind === 'keyId') return cert.subjectKeyIdentifier !== undefined && sid.keyId.equals(cert.subjectKeyIdentifier);
  return sid.issuer.equals(cert.issuer) && sid.serial.equals(cert.serial);
}

function describeSid(sid: SignerInfo['sid']): string {
  return sid.kind === 'keyId' ? `subject key id ${colonHex(sid.keyId)}` : `"${sid.signer}" (serial ${sid.keyId})`;
}

/**
 * Verifies the appended signature against `certificate`: the signer identifier names the
 * certificate, the digest and the RSA or ECDSA signature check out.
 * @throws ModuleSignatureError; SigningKeyError `InvalidCertificate` for an unreadable certificate.
 */
export async function verifyModuleSignature(module: Buffer, certificate: Buffer | string, signal?: AbortSignal): Promise<VerifiedSignature> {
  signal?.throwIfAborted();
  const cert = parseCertificate(certificate);
  const { content: signedContent, signature } = splitModuleSignature(module);
  if (!signature) throw new ModuleSignatureError('NotSigned', 'the module is not signed (no "~Module signature appended~" trailer)');
  let signers: SignerInfo[];
  try {
    signers = parseCms(signature);
  } catch (err) {
    if (err instanceof ModuleSignatureError) throw err;
    throw new ModuleSignatureError('InvalidSignature', `the module signature is not a valid CMS structure: ${(err as Error).message}`, { cause: err });
  }
  const si = signers.find((s) => sidMatches(s.sid, cert));
  if (!si) {
    const names = signers.map((s) => describeSid(s.sid)).join(', ') || 'no signer';
    throw new ModuleSignatureError('WrongSigner', `the module is signed by ${names}, not by the certificate "${cert.signer}" (serial ${cert.keyId})`);
  }
  const keyType = cert.x509.publicKey.asymmetricKeyType;
  const h = HASHES[si.hash];
  const rsa = si.signatureAlgorithm === OID.rsaEncryption || si.signatureAlgorithm === h.rsaOid;
  const ecdsa = si.signatureAlgorithm === h.ecdsaOid;
  if (!rsa && !ecdsa) {
    throw new ModuleSignatureError('UnsupportedSignature', `the module signature uses signature algorithm ${si.signatureAlgorithm} with ${si.hash}`);
  }
  if ((rsa && keyType !== 'rsa') || (ecdsa && keyType !== 'ec')) {
    throw new ModuleSignatureError('BadSignature', `the module signature is ${rsa ? 'RSA' : 'ECDSA'} but the certificate holds a ${keyType} key`);
  }
  let signed = signedContent;
  if (si.signedAttributes) {
    const digest = await digestInSlices(si.hash, signedContent, signal);
    if (!digest.equals(si.signedAttributes.messageDigest)) {
      throw new ModuleSignatureError('BadSignature', `the module's ${si.hash} digest does not match the signature's messageDigest: the module was changed after signing`);
    }
    signed = si.signedAttributes.der;
  }
  const ok = rsa
    ? await rsaVerify(si.hash, signed, cert.x509.publicKey, si.signature, signal)
    : await inPool<boolean>((done) => cryptoVerify(si.hash, signed, cert.x509.publicKey, si.signature, done), signal);
  if (!ok) {
    throw new ModuleSignatureError('BadSignature', `the module signature by "${cert.signer}" (serial ${cert.keyId}) does not verify: the module or its signature was changed`);
  }
  const id = si.sid.kind === 'issuerAndSerial' ? { signer: si.sid.signer, keyId: si.sid.keyId } : { signer: cert.signer, keyId: colonHex(si.sid.keyId) };
  return { ...id, hashAlgorithm: si.hash };
}

// ---------------------------------------------------------------------------------------------
// Module files

function compressionOf(fileName: string): 'none' | 'xz' | 'zst' | 'gz' {
  const compression = moduleCompression(fileName);
  if (!compression) throw new ModinfoError(`${fileName} is not a kernel module file name (.ko, .ko.xz, .ko.zst or .ko.gz)`);
  return compression;
}

/**
 * Signs a module file by name: `.ko` as is; `.ko.xz`, `.ko.zst`, `.ko.gz` decompressed (bounded by
 * `maxBytes`), signed, and compressed again in the same format: xz with a CRC32 check and a 1 MiB
 * dictionary as the kernel's Makefile.modinst writes it (stored LZMA2 chunks, see
 * xz-container.ts), zstd (level 3, with a checksum, as the zstd tool), gzip (level 6).
 * @throws ModinfoError for a name that is not a module's, or content that does not decompress;
 *   ModuleSignatureError for an existing signature that cannot be stripped.
 */
export async function signModuleFile(
  data: Buffer,
  fileName: string,
  signer: ModuleSigner,
  options: { maxBytes: number; signal?: AbortSignal },
): Promise<Buffer> {
  const { signal } = options;
  signal?.throwIfAborted();
  const compression = compressionOf(fileName);
  const module = await decompressModule(data, compression, options.maxBytes);
  signal?.throwIfAborted();
  const signed = await signer.sign(module, signal);
  let out: Buffer;
  switch (compression) {
    case 'none':
      return signed;
    case 'xz':
      return xzStore(signed, signal);
    case 'zst':
      out = await zstdCompress(signed, { params: { [zlib.constants.ZSTD_c_compressionLevel]: 3, [zlib.constants.ZSTD_c_checksumFlag]: 1 } });
      break;
    case 'gz':
      out = await gzip(signed, { level: 6 });
      break;
  }
  signal?.throwIfAborted();
  return out;
}

/**
 * Verifies a module file by name (decompressing `.ko.xz`, `.ko.zst`, `.ko.gz` within `maxBytes`).
 * @throws ModuleSignatureError; ModinfoError for a file that does not decompress.
 */
export async function verifyModuleFile(
  data: Buffer,
  fileName: string,
  certificate: Buffer | string,
  options: { maxBytes: number; signal?: AbortSignal },
): Promise<VerifiedSignature> {
  options.signal?.throwIfAborted();
  const module = await decompressModule(data, compressionOf(fileName), options.maxBytes);
  return verifyModuleSignature(module, certificate, options.signal);
}
