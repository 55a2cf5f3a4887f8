import t, { type Test } from 'tap';
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { ModinfoError } from '../../src/engine/modinfo.ts';
import {
  createModuleSigner,
  ModuleSignatureError,
  SigningKeyError,
  splitModuleSignature,
  verifyModuleSignature,
  type ModuleSigner,
  type SignHashAlgorithm,
} from '../../src/sign/module-signature.ts';
import { bytes, children, readTlv } from '../../src/sign/der.ts';
import { ensureDebianBinary } from '../helpers/debian.ts';
import { appendLegacySignature, buildModuleObject, kmodModinfo, writeTemp } from '../helpers/kmod-fixtures.ts';
import { ensureSignFile, makeSigningKey, opensslCmsVerify, signWithSignFile, type SigningKeyFiles } from '../helpers/sign-file.ts';

const run = promisify(execFile);
const VERMAGIC = '6.1.0-18-amd64 SMP preempt mod_unload modversions ';
const spec = { name: 'kmm_ci_a', vermagic: VERMAGIC, depends: ['kmm_ci_b'], extra: { license: 'GPL', srcversion: '0123456789ABCDEF0123456' } };
const MiB = 1024 * 1024;

let module: Buffer;
let rsa2048: SigningKeyFiles;
let rsa4096: SigningKeyFiles;
let ecP256: SigningKeyFiles;
let other: SigningKeyFiles;

t.before(async () => {
  await ensureSignFile();
  await ensureDebianBinary('modinfo', 'kmod');
  module = await buildModuleObject(spec);
  [rsa2048, rsa4096, ecP256, other] = await Promise.all([
    makeSigningKey({ type: 'rsa', bits: 2048 }, 'kmm-preflight test key 2048'),
    makeSigningKey({ type: 'rsa', bits: 4096 }, 'kmm-preflight test key 4096'),
    makeSigningKey({ type: 'ec', curve: 'prime256v1' }, 'kmm-preflight EC key'),
    makeSigningKey({ type: 'rsa', bits: 2048 }, 'another signer'),
  ]);
});

t.teardown(async () => {
  await Promise.all([rsa2048, rsa4096, ecP256, other].map((k) => k?.cleanup()));
});

/** The DER of every SignedData and SignerInfo field except the signature value, in order. */
function cmsFieldsButSignature(signed: Buffer): string[] {
  const cms = splitModuleSignature(signed).signature!;
  const [contentType, wrapper] = children(cms, readTlv(cms, 0));
  const sd = children(cms, children(cms, wrapper!)[0]!);
  const signerInfo = children(cms, children(cms, sd[sd.length - 1]!)[0]!);
  return [contentType!, ...sd.slice(0, -1), ...signerInfo.slice(0, -1)].map((f) => bytes(cms, f).toString('hex'));
}

/** modinfo's signature fields of `data` (written as a .ko). */
async function modinfoSignature(data: Buffer): Promise<{ signer: string; keyId: string; hashAlgorithm: string; sigId: string }> {
  const file = await writeTemp('kmm_ci_a.ko', data);
  try {
    return {
      signer: await kmodModinfo('signer', file.path),
      keyId: await kmodModinfo('sig_key', file.path),
      hashAlgorithm: await kmodModinfo('sig_hashalgo', file.path),
      sigId: await kmodModinfo('sig_id', file.path),
    };
  } finally {
    await file.cleanup();
  }
}

async function rejectsWith(t: Test, p: Promise<unknown>, type: new (...args: never[]) => Error, code: string | undefined, message?: RegExp): Promise<void> {
  const err = await p.then(
    () => undefined,
    (e: unknown) => e as Error & { code?: string },
  );
  t.ok(err instanceof type, `rejects with ${type.name}${err ? ` (got ${err.name}: ${err.message})` : ' (it resolved)'}`);
  if (code !== undefined) t.equal(err?.code, code);
  if (message) t.match(err?.message, message);
}

t.test('RSA signatures are byte-identical to Debian sign-file and read by modinfo as the API reports', async (t) => {
  for (const [name, keys] of [['RSA 2048', () => rsa2048], ['RSA 4096', () => rsa4096]] as const) {
    for (const hash of ['sha256', 'sha512'] as const) {
      for (const certForm of ['DER', 'PEM'] as const) {
        const k = keys();
        const certPath = certForm === 'DER' ? k.certDerPath : k.certPemPath;
        const signer = createModuleSigner(k.key, certForm === 'DER' ? k.certDer : k.certPem, hash);
        const ours = await signer.sign(module);
        const theirs = await signWithSignFile(module, { hash, keyPath: k.keyPath, certPath });
        t.ok(ours.equals(theirs), `${name} ${hash} ${certForm} certificate: same ${theirs.length} bytes as sign-file`);
        const shown = await modinfoSignature(ours);
        t.same(shown, { signer: signer.signer, keyId: signer.keyId, hashAlgorithm: hash, sigId: 'PKCS#7' }, `${name} ${hash}: modinfo shows the signer, key id and hash the API reports`);
        t.equal(signer.hashAlgorithm, hash);
      }
    }
  }
  t.equal(createModuleSigner(rsa2048.key, rsa2048.certDer).signer, 'kmm-preflight test key 2048', 'the signer is the certificate CN');
  t.match(createModuleSigner(rsa2048.key, rsa2048.certDer).keyId, /^[0-9A-F]{2}(:[0-9A-F]{2})*$/, 'the key id is upper-case hex joined by colons');
});

t.test('the other hashes (sha1, sha224, sha384) and the default (sha256) match sign-file too', async (t) => {
  for (const hash of ['sha1', 'sha224', 'sha384'] as const) {
    const ours = await createModuleSigner(rsa2048.key, rsa2048.certPem, hash).sign(module);
    t.ok(ours.equals(await signWithSignFile(module, { hash, keyPath: rsa2048.keyPath, certPath: rsa2048.certPemPath })), hash);
    t.equal((await modinfoSignature(ours)).hashAlgorithm, hash);
  }
  const byDefault = await createModuleSigner(rsa2048.key, rsa2048.certDer).sign(module);
  t.ok(byDefault.equals(await signWithSignFile(module, { hash: 'sha256', keyPath: rsa2048.keyPath, certPath: rsa2048.certDerPath })), 'default sha256');
});

t.test('a key and certificate in one PEM file (the kernel signing_key.pem) and keys as strings', async (t) => {
  const combined = Buffer.concat([rsa2048.key, rsa2048.certPem]);
  const path = join(rsa2048.dir, 'signing_key.pem');
  await writeFile(path, combined);
  const ours = await createModuleSigner(combined, combined).sign(module);
  t.ok(ours.equals(await signWithSignFile(module, { hash: 'sha256', keyPath: path, certPath: path })));
  const fromStrings = await createModuleSigner(rsa2048.key.toString(), rsa2048.certPem.toString()).sign(module);
  t.ok(fromStrings.equals(ours));
});

t.test('re-signing replaces the signature instead of appending a second one', async (t) => {
  const signer = createModuleSigner(rsa2048.key, rsa2048.certDer);
  const once = await signer.sign(module);
  t.ok((await signer.sign(once)).equals(once), 're-signing our output gives the same bytes');
  const bySignFile = await signWithSignFile(module, { hash: 'sha512', keyPath: other.keyPath, certPath: other.certDerPath });
  t.ok((await signer.sign(bySignFile)).equals(once), 'a module signed by sign-file with another key: same bytes as signing the unsigned one');
  // sign-file itself signs a signed module again, appending a second signature.
  const twice = await signWithSignFile(once, { hash: 'sha256', keyPath: rsa2048.keyPath, certPath: rsa2048.certDerPath });
  t.ok(twice.length > once.length, 'sign-file appends a second signature');
  t.ok((await signer.sign(twice)).equals(once), 'a module signed twice by sign-file: every signature stripped, one added');
  const split = splitModuleSignature(once);
  t.ok(split.content.equals(module), 'splitModuleSignature gives back the unsigned module');
  t.ok(split.signature && split.signature[0] === 0x30, 'and the CMS DER');
  t.equal(splitModuleSignature(module).signature, undefined, 'an unsigned module has no signature');
  t.ok(splitModuleSignature(module).content.equals(module));
});

t.test('a key that does not match the certificate: KeyMismatch naming both', async (t) => {
  const err = (() => {
    try {
      createModuleSigner(rsa2048.key, other.certDer);
      return undefined;
    } catch (e) {
      return e as SigningKeyError;
    }
  })();
  t.ok(err instanceof SigningKeyError);
  t.equal(err?.code, 'KeyMismatch');
  t.match(err?.message, /does not match the certificate/);
  t.match(err?.message, /the signing key is a 2048-bit RSA key \(public key SHA-256 [0-9A-F:]+…\)/, 'names the key');
  t.match(err?.message, /holds a 2048-bit RSA key \(public key SHA-256 [0-9A-F:]+…\)/, "names the certificate's key");
  t.match(err?.message, /CN=another signer/, "names the certificate's subject");
  t.notMatch(err?.message, /PRIVATE KEY/, 'no key material');
  t.throws(() => createModuleSigner(ecP256.key, rsa2048.certDer), { code: 'KeyMismatch' }, 'an EC key for an RSA certificate');
});

t.test('unreadable keys and certificates', async (t) => {
  t.throws(() => createModuleSigner(Buffer.from('not a key'), rsa2048.certDer), { name: 'SigningKeyError', code: 'InvalidKey' });
  t.throws(() => createModuleSigner(randomBytes(300), rsa2048.certDer), { code: 'InvalidKey' }, 'random DER');
  t.throws(() => createModuleSigner('-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n', rsa2048.certDer), { code: 'InvalidKey' });
  t.throws(() => createModuleSigner(rsa2048.key, Buffer.from('garbage')), { name: 'SigningKeyError', code: 'InvalidCertificate' });
  t.throws(() => createModuleSigner(rsa2048.key, rsa2048.certDer.subarray(0, 100)), { code: 'InvalidCertificate' }, 'truncated DER');
  t.throws(() => createModuleSigner(rsa2048.key, rsa2048.key), { code: 'InvalidCertificate' }, 'a key where the certificate goes');
  const openssl = await ensureDebianBinary('openssl', 'openssl');
  const encrypted = join(rsa2048.dir, 'encrypted.pem');
  await run(openssl, ['pkey', '-in', rsa2048.keyPath, '-aes256', '-passout', 'pass:secret', '-out', encrypted]);
  const encryptedKey = await readFile(encrypted);
  t.throws(() => createModuleSigner(encryptedKey, rsa2048.certDer), { code: 'InvalidKey', message: /encrypted/ }, 'a passphrase-protected key');
  const ed = join(rsa2048.dir, 'ed');
  await run(openssl, ['req', '-x509', '-new', '-nodes', '-batch', '-newkey', 'ed25519', '-subj', '/CN=ed', '-keyout', `${ed}.key`, '-out', `${ed}.pem`]);
  const [edKey, edCert] = await Promise.all([readFile(`${ed}.key`), readFile(`${ed}.pem`)]);
  t.throws(() => createModuleSigner(edKey, edCert), { code: 'UnsupportedKey', message: /ED25519/ }, 'Ed25519');
  t.throws(() => createModuleSigner(rsa2048.key, rsa2048.certDer, 'md5' as SignHashAlgorithm), { code: 'UnsupportedKey', message: /md5/ });
});

t.test('sign() refuses what is not an ELF module, and a signature it cannot strip', async (t) => {
  const signer = createModuleSigner(rsa2048.key, rsa2048.certDer);
  await rejectsWith(t, signer.sign(Buffer.from('plain text, not a module')), ModinfoError, undefined, /not an ELF file/);
  const legacy = appendLegacySignature(module, 'old signer', Buffer.from('0102', 'hex'), Buffer.alloc(64, 1));
  await rejectsWith(t, signer.sign(legacy), ModuleSignatureError, 'UnsupportedSignature', /not PKCS#7/);
  const bogus = Buffer.concat([module, Buffer.from([0, 0, 2, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]), Buffer.from('~Module signature appended~\n')]);
  await rejectsWith(t, signer.sign(bogus), ModuleSignatureError, 'InvalidSignature');
});

t.test('verifyModuleSignature', async (t) => {
  const signer = createModuleSigner(rsa2048.key, rsa2048.certDer, 'sha512');
  const ours = await signer.sign(module);
  t.same(await verifyModuleSignature(ours, rsa2048.certPem), { signer: signer.signer, keyId: signer.keyId, hashAlgorithm: 'sha512' }, "accepts the project's signature");
  const theirs = await signWithSignFile(module, { hash: 'sha256', keyPath: rsa4096.keyPath, certPath: rsa4096.certDerPath });
  const v = await verifyModuleSignature(theirs, rsa4096.certDer);
  t.same(v, await modinfoSignature(theirs).then(({ signer, keyId, hashAlgorithm }) => ({ signer, keyId, hashAlgorithm })), "accepts sign-file's, and reports what modinfo shows");

  const tampered = Buffer.from(ours);
  tampered[100] = tampered[100]! ^ 0x01;
  await rejectsWith(t, verifyModuleSignature(tampered, rsa2048.certDer), ModuleSignatureError, 'BadSignature', /does not verify/);
  const badSig = Buffer.from(ours);
  const sigByte = module.length + splitModuleSignature(ours).signature!.length - 10;
  badSig[sigByte] = badSig[sigByte]! ^ 0x80;
  await rejectsWith(t, verifyModuleSignature(badSig, rsa2048.certDer), ModuleSignatureError, 'BadSignature');
  await rejectsWith(t, verifyModuleSignature(ours, other.certDer), ModuleSignatureError, 'WrongSigner', /kmm-preflight test key 2048.*another signer/);
  await rejectsWith(t, verifyModuleSignature(module, rsa2048.certDer), ModuleSignatureError, 'NotSigned');
  const garbled = Buffer.from(ours);
  garbled[module.length + 1] = 0x05; // the ContentInfo's length
  await rejectsWith(t, verifyModuleSignature(garbled, rsa2048.certDer), ModuleSignatureError, 'InvalidSignature');
  await rejectsWith(t, verifyModuleSignature(ours, Buffer.from('x')), SigningKeyError, 'InvalidCertificate');

  const byKeyId = await signWithSignFile(module, { hash: 'sha256', keyPath: rsa2048.keyPath, certPath: rsa2048.certDerPath, subjectKeyIdentifier: true });
  const kv = await verifyModuleSignature(byKeyId, rsa2048.certDer);
  t.equal(kv.signer, signer.signer, 'sign-file -k (subject key identifier): accepted');
  t.not(kv.keyId, signer.keyId, 'its key id is the subject key identifier, not the serial');
  await rejectsWith(t, verifyModuleSignature(byKeyId, other.certDer), ModuleSignatureError, 'WrongSigner');
});

t.test('EC P-256: sign-file supports it; signatures verify with ours, openssl cms and modinfo', async (t) => {
  const signer = createModuleSigner(ecP256.key, ecP256.certDer, 'sha256');
  const ours = await signer.sign(module);
  const theirs = await signWithSignFile(module, { hash: 'sha256', keyPath: ecP256.keyPath, certPath: ecP256.certDerPath });
  t.not(ours.equals(theirs), true, 'ECDSA is randomised: the bytes differ');
  t.equal(ours.length - theirs.length <= 2 && theirs.length - ours.length <= 2, true, 'but only in the signature value');
  t.same(await verifyModuleSignature(ours, ecP256.certDer), { signer: signer.signer, keyId: signer.keyId, hashAlgorithm: 'sha256' });
  t.same(await verifyModuleSignature(theirs, ecP256.certPem), { signer: signer.signer, keyId: signer.keyId, hashAlgorithm: 'sha256' }, "sign-file's EC signature verifies");
  const { content, signature } = splitModuleSignature(ours);
  t.ok(await opensslCmsVerify(signature!, content, ecP256.certPemPath), 'openssl cms -verify accepts ours');
  t.notOk(await opensslCmsVerify(signature!, Buffer.concat([content, Buffer.from([0])]), ecP256.certPemPath), 'and rejects it over other content');
  t.same(await modinfoSignature(ours), { signer: signer.signer, keyId: signer.keyId, hashAlgorithm: 'sha256', sigId: 'PKCS#7' });
  t.same(cmsFieldsButSignature(ours), cmsFieldsButSignature(theirs), 'every CMS field but the signature value is what sign-file writes');
  const tampered = Buffer.from(ours);
  tampered[64] = tampered[64]! ^ 0xff;
  await rejectsWith(t, verifyModuleSignature(tampered, ecP256.certDer), ModuleSignatureError, 'BadSignature');
  const sha384 = await createModuleSigner(ecP256.key, ecP256.certDer, 'sha384').sign(module);
  t.equal((await verifyModuleSignature(sha384, ecP256.certDer)).hashAlgorithm, 'sha384');
  t.equal((await modinfoSignature(sha384)).hashAlgorithm, 'sha384');
});

t.test('an aborted signal rejects signing and verification', async (t) => {
  const signer = createModuleSigner(rsa2048.key, rsa2048.certDer);
  const aborted = AbortSignal.abort();
  await t.rejects(signer.sign(module, aborted), { name: 'AbortError' });
  await t.rejects(verifyModuleSignature(await signer.sign(module), rsa2048.certDer, aborted), { name: 'AbortError' });
  const big = Buffer.concat([module, randomBytes(32 * MiB)]);
  const ac = new AbortController();
  const p = signer.sign(big, ac.signal);
  ac.abort();
  await t.rejects(p, { name: 'AbortError' }, 'aborted while the thread pool signs');
});

t.test('signing works in slices: other work runs between the 1 MiB steps of a large module (the timings are in bench/sign.ts)', async (t) => {
  const signer: ModuleSigner = createModuleSigner(rsa4096.key, rsa4096.certDer, 'sha512');
  const big = Buffer.concat([module, randomBytes(10 * MiB - module.length)]);
  const inputs = Array.from({ length: 4 }, (_, i) => [0, 1].map((j) => Buffer.concat([big.subarray(0, big.length - 1), Buffer.from([i * 2 + j])])));
  // Counts the turns of the event loop that other work gets while modules are signed.
  const turns = async <T>(work: () => Promise<T>): Promise<{ result: T; turns: number }> => {
    let n = 0;
    let running = true;
    const spin = () => {
      if (!running) return;
      n++;
      setImmediate(spin);
    };
    setImmediate(spin);
    const result = await work();
    running = false;
    return { result, turns: n };
  };
  const many = await turns(() =>
    Promise.all(
      inputs.map(async (copies) => {
        const signed: Buffer[] = [];
        for (const c of copies) signed.push(await signer.sign(c));
        return signed;
      }),
    ),
  );
  t.equal(many.result.flat().length, 8);
  // Four signers at once each take a 1 MiB step per turn: at least 80 MiB / 4 turns.
  t.ok(many.turns >= (8 * 10) / 4, `other work ran ${many.turns} times while 8 modules of 10 MiB were signed, 4 at once`);
  const huge = Buffer.concat([big, Buffer.alloc(90 * MiB, 0x5a)]);
  const one = await turns(() => signer.sign(huge));
  t.ok(one.turns >= 100, `other work ran ${one.turns} times while a 100 MiB module was signed`);
  t.equal(splitModuleSignature(one.result).content.length, huge.length);
  t.same(await verifyModuleSignature(many.result[3]![1]!, rsa4096.certDer), { signer: signer.signer, keyId: signer.keyId, hashAlgorithm: 'sha512' });
});
