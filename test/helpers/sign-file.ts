/**
 * Debian's `sign-file` (package linux-kbuild-6.1, not on PATH) and signing keys made with the
 * `openssl` tool as KMM users make them, for the module signing tests and benchmark.
 */
import { execFile } from 'node:child_process';
import { access, constants, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { ensureDebianBinary } from './debian.ts';

const run = promisify(execFile);

export const SIGN_FILE_PACKAGE = 'linux-kbuild-6.1';
export const SIGN_FILE = `/usr/lib/${SIGN_FILE_PACKAGE}/scripts/sign-file`;

let ensured: Promise<string> | undefined;

async function executable(path: string): Promise<boolean> {
  try {
    await access(path, constants.X_OK);
    return true;
  } catch {
    return false;
  }
}

/**
 * The path of Debian's sign-file, installing linux-kbuild-6.1 with apt when it is missing and this
 * runs as root.
 * @throws Error naming the package when it cannot be installed here.
 */
export function ensureSignFile(): Promise<string> {
  ensured ??= (async () => {
    if (await executable(SIGN_FILE)) return SIGN_FILE;
    if (process.getuid?.() !== 0) {
      throw new Error(`${SIGN_FILE} is missing: install the Debian package ${SIGN_FILE_PACKAGE} (apt-get install ${SIGN_FILE_PACKAGE}) or run the tests as root`);
    }
    const env = { ...process.env, DEBIAN_FRONTEND: 'noninteractive' };
    try {
      await run('apt-get', ['update', '-qq'], { timeout: 300_000, env });
      await run('apt-get', ['install', '-y', '-qq', SIGN_FILE_PACKAGE], { timeout: 600_000, env });
    } catch (err) {
      throw new Error(`sign-file is missing and apt-get install ${SIGN_FILE_PACKAGE} failed: ${(err as Error).message}`, { cause: err });
    }
    if (!(await executable(SIGN_FILE))) throw new Error(`apt-get installed ${SIGN_FILE_PACKAGE} but ${SIGN_FILE} is not there`);
    return SIGN_FILE;
  })();
  ensured.catch(() => {
    ensured = undefined; // let a later call try again
  });
  return ensured;
}

/**
 * `sign-file [-k] <hash> <key> <cert> <module> <dest>` on a copy of `module`; returns the output.
 */
export async function signWithSignFile(
  module: Buffer,
  options: { hash: string; keyPath: string; certPath: string; subjectKeyIdentifier?: boolean },
): Promise<Buffer> {
  const signFile = await ensureSignFile();
  const dir = await mkdtemp(join(tmpdir(), 'sign-file-'));
  try {
    const input = join(dir, 'in.ko');
    const output = join(dir, 'out.ko');
    await writeFile(input, module);
    const args = [...(options.subjectKeyIdentifier ? ['-k'] : []), options.hash, options.keyPath, options.certPath, input, output];
    await run(signFile, args);
    return await readFile(output);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

export type KeySpec = { readonly type: 'rsa'; readonly bits: 2048 | 3072 | 4096 } | { readonly type: 'ec'; readonly curve: 'prime256v1' | 'secp384r1' };

export interface SigningKeyFiles {
  readonly dir: string;
  /** PEM private key (PKCS#8, as `openssl req -newkey` writes it). */
  readonly keyPath: string;
  /** DER certificate (`-outform DER`, as KMM's docs make it). */
  readonly certDerPath: string;
  readonly certPemPath: string;
  readonly key: Buffer;
  readonly certDer: Buffer;
  readonly certPem: Buffer;
  cleanup(): Promise<void>;
}

/**
 * A private key and a self-signed certificate from
 * `openssl req -x509 -new -nodes -utf8 -sha256 -days 36500 -batch -outform DER -keyout key.pem -out cert.der`,
 * plus the certificate in PEM.
 */
export async function makeSigningKey(spec: KeySpec, commonName: string): Promise<SigningKeyFiles> {
  const openssl = await ensureDebianBinary('openssl', 'openssl');
  const dir = await mkdtemp(join(tmpdir(), 'signing-key-'));
  const keyPath = join(dir, 'key.pem');
  const certDerPath = join(dir, 'cert.der');
  const certPemPath = join(dir, 'cert.pem');
  const newkey = spec.type === 'rsa' ? ['-newkey', `rsa:${spec.bits}`] : ['-newkey', 'ec', '-pkeyopt', `ec_paramgen_curve:${spec.curve}`];
  await run(openssl, [
    'req', '-x509', '-new', '-nodes', '-utf8', '-sha256', '-days', '36500', '-batch',
    ...newkey, '-subj', `/CN=${commonName}/O=kmm-preflight tests`,
    '-outform', 'DER', '-keyout', keyPath, '-out', certDerPath,
  ]);
  await run(openssl, ['x509', '-inform', 'DER', '-in', certDerPath, '-out', certPemPath]);
  return {
    dir,
    keyPath,
    certDerPath,
    certPemPath,
    key: await readFile(keyPath),
    certDer: await readFile(certDerPath),
    certPem: await readFile(certPemPath),
    cleanup: () => rm(dir, { recursive: true, force: true }),
  };
}

/**
 * `openssl cms -verify` of a detached CMS signature over `content` with `certPemPath` as the only
 * signer certificate (no chain check: module certificates are self-signed). Resolves true when
 * openssl reports success.
 */
export async function opensslCmsVerify(signature: Buffer, content: Buffer, certPemPath: string): Promise<boolean> {
  const openssl = await ensureDebianBinary('openssl', 'openssl');
  const dir = await mkdtemp(join(tmpdir(), 'cms-verify-'));
  try {
    await writeFile(join(dir, 'sig.der'), signature);
    await writeFile(join(dir, 'content'), content);
    await run(openssl, [
      'cms', '-verify', '-binary', '-inform', 'DER', '-in', join(dir, 'sig.der'), '-content', join(dir, 'content'),
      '-certfile', certPemPath, '-nointern', '-noverify', '-out', '/dev/null',
    ]);
    return true;
  } catch {
    return false;
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}
