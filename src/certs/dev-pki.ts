/**
 * A development PKI for running the aggregated API server stand-alone (outside a cluster): a
 * throw-away CA, a serving certificate, an admin client certificate in `system:masters`, and a
 * kubeconfig that lets `kubectl` talk to the server directly.
 *
 * These are development credentials only. In a cluster the serving certificate comes from the
 * deploy manifests (service-ca / cert-manager) and clients are authenticated by the
 * kube-apiserver's front proxy, never by this CA.
 *
 * Also exports the low-level issuing helpers ({@link generateCa}, {@link issueCertificate},
 * {@link issueClientCertificate}) so tests elsewhere can mint users with other names and groups,
 * or certificates from a foreign CA.
 */

import { createPrivateKey, generateKeyPair, generateKeyPairSync, randomBytes, X509Certificate } from 'node:crypto';
import type { KeyObject } from 'node:crypto';
import { mkdir, open, readFile, rename, rm } from 'node:fs/promises';
import { isIP } from 'node:net';
import { join } from 'node:path';
import { promisify } from 'node:util';
import forge from 'node-forge';
import { parse as parseYaml, stringify as stringifyYaml } from 'yaml';

/** Common name of the development CA. */
export const DEV_CA_COMMON_NAME = 'kmm-preflight-dev-ca';
/** Common name of the serving certificate. */
export const SERVER_COMMON_NAME = 'kmm-preflight';
/** Common name (user name) of the admin client certificate. */
export const ADMIN_COMMON_NAME = 'kmm-preflight-admin';
/** Organization (group) of the admin client certificate: the group RBAC treats as cluster-admin. */
export const ADMIN_ORGANIZATION = 'system:masters';
/** Name of the cluster and context in the generated kubeconfig. */
export const KUBECONFIG_CLUSTER_NAME = 'kmm-preflight';
/** Name of the user in the generated kubeconfig. */
export const KUBECONFIG_USER_NAME = ADMIN_COMMON_NAME;
/** Default validity of the generated certificates, in days. */
export const DEFAULT_VALIDITY_DAYS = 365;

/**
 * SANs every serving certificate carries: loopback for the stand-alone server, and the service
 * names the same certificate would need if the dev PKI is reused in a kind/minikube cluster.
 */
export const DEFAULT_SERVER_SANS: readonly string[] = [
  'localhost',
  'kmm-preflight',
  'kmm-preflight.kmm-preflight',
  'kmm-preflight.kmm-preflight.svc',
  'kmm-preflight.kmm-preflight.svc.cluster.local',
  '127.0.0.1',
  '::1',
];

// Certificates are dated back so that a peer whose clock is slightly behind ours (a VM, a kind
// node) does not reject a certificate issued "in the future".
const CLOCK_SKEW_MS = 60_000;
const DAY_MS = 86_400_000;
const RSA_BITS = 2048;

/** A PEM certificate and its PEM (PKCS#8) private key. */
export interface CertificateAndKey {
  readonly certPem: string;
  readonly keyPem: string;
}

/** Where {@link generateDevPki} writes each file. */
export interface DevPkiPaths {
  readonly dir: string;
  readonly caCert: string;
  readonly caKey: string;
  readonly serverCert: string;
  readonly serverKey: string;
  readonly adminCert: string;
  readonly adminKey: string;
  readonly kubeconfig: string;
}

/** Options of {@link generateDevPki} and {@link ensureDevPki}. */
export interface DevPkiOptions {
  /** Directory to write into; created (mode 0700) when missing. */
  readonly dir: string;
  /** URL of the stand-alone server, written into the kubeconfig (e.g. `https://127.0.0.1:6443`). */
  readonly serverUrl: string;
  /**
   * Additional subject alternative names of the serving certificate: an IP literal becomes an IP
   * SAN, anything else a DNS SAN.
   */
  readonly extraSans?: readonly string[];
  /** Validity of every certificate in days; default {@link DEFAULT_VALIDITY_DAYS}. */
  readonly days?: number;
}

/** Result of {@link ensureDevPki}. */
export interface EnsureDevPkiResult {
  /** True when the whole PKI was (re)generated. */
  readonly created: boolean;
  /** True when only the kubeconfig was (re)written; false when `created` is true. */
  readonly kubeconfigUpdated: boolean;
  /** Why the PKI was regenerated, when `created` is true. */
  readonly reason?: string;
  readonly paths: DevPkiPaths;
}

/** Subject and extensions of a certificate to issue with {@link issueCertificate}. */
export interface IssueCertificateOptions {
  /** Issuing CA; omit for a self-signed certificate. */
  readonly issuer?: CertificateAndKey;
  readonly commonName: string;
  /** One `O` attribute each; for client certificates Kubernetes reads them as groups. */
  readonly organizations?: readonly string[];
  /** When true, a CA certificate (basicConstraints CA:true, keyCertSign+cRLSign). */
  readonly isCa?: boolean;
  /** Subject alternative names: an IP literal becomes an IP SAN, anything else a DNS SAN. */
  readonly sans?: readonly string[];
  readonly extKeyUsage?: readonly ('serverAuth' | 'clientAuth')[];
  /** Validity in days; default {@link DEFAULT_VALIDITY_DAYS}. */
  readonly days?: number;
  /** A pre-generated key pair; a new RSA 2048 key is generated otherwise. */
  readonly keyPair?: { readonly privateKey: KeyObject; readonly publicKey: KeyObject };
}

/** Options of {@link issueClientCertificate}. */
export interface IssueClientCertificateOptions {
  readonly caCertPem: string;
  readonly caKeyPem: string;
  /** Kubernetes user name. */
  readonly commonName: string;
  /** Kubernetes groups. */
  readonly organizations?: readonly string[];
  /** Validity in days; default {@link DEFAULT_VALIDITY_DAYS}. */
  readonly days?: number;
}

/** The paths of the dev PKI files inside `dir`. */
export function devPkiPaths(dir: string): DevPkiPaths {
  return {
    dir,
    caCert: join(dir, 'ca.crt'),
    caKey: join(dir, 'ca.key'),
    serverCert: join(dir, 'server.crt'),
    serverKey: join(dir, 'server.key'),
    adminCert: join(dir, 'admin.crt'),
    adminKey: join(dir, 'admin.key'),
    kubeconfig: join(dir, 'kubeconfig'),
  };
}

/**
 * Issues a certificate with node-forge.
 *
 * Synchronous so test fixtures can mint certificates inline; key generation uses Node's native
 * RSA (tens of milliseconds) rather than forge's pure-JS prime search.
 *
 * @throws Error when a SAN is neither an IP literal nor a plausible DNS name, or `days` is not positive.
 */
export function issueCertificate(options: IssueCertificateOptions): CertificateAndKey {
  const keyPair = options.keyPair ?? generateKeyPairSync('rsa', { modulusLength: RSA_BITS });
  const days = validityDays(options.days);
  const publicKey = forge.pki.publicKeyFromPem(keyPair.publicKey.export({ type: 'spki', format: 'pem' }).toString());

  const cert = forge.pki.createCertificate();
  cert.publicKey = publicKey;
  cert.serialNumber = randomSerialHex();
  const now = Date.now();
  cert.validity.notBefore = new Date(now - CLOCK_SKEW_MS);
  cert.validity.notAfter = new Date(now + days * DAY_MS);

  const subject: forge.pki.CertificateField[] = [{ name: 'commonName', value: options.commonName }];
  for (const organization of options.organizations ?? []) {
    subject.push({ name: 'organizationName', value: organization });
  }
  cert.setSubject(subject);

  let signingKey: forge.pki.rsa.PrivateKey;
  const extensions: object[] = [];
  if (options.issuer) {
    const issuerCert = forge.pki.certificateFromPem(options.issuer.certPem);
    cert.setIssuer(issuerCert.subject.attributes);
    signingKey = forge.pki.privateKeyFromPem(pkcs1Pem(options.issuer.keyPem));
    // Lets verifiers pick the right issuer when several CAs share a subject (e.g. after regeneration).
    extensions.push({ name: 'authorityKeyIdentifier', keyIdentifier: issuerCert.generateSubjectKeyIdentifier().getBytes() });
  } else {
    cert.setIssuer(subject);
    signingKey = forge.pki.privateKeyFromPem(keyPair.privateKey.export({ type: 'pkcs1', format: 'pem' }).toString());
  }

  if (options.isCa) {
    extensions.push(
      { name: 'basicConstraints', cA: true, critical: true },
      { name: 'keyUsage', keyCertSign: true, cRLSign: true, critical: true },
    );
  } else {
    extensions.push(
      { name: 'basicConstraints', cA: false, critical: true },
      { name: 'keyUsage', digitalSignature: true, keyEncipherment: true, critical: true },
    );
  }
  const extKeyUsage = options.extKeyUsage ?? [];
  if (extKeyUsage.length > 0) {
    extensions.push({
      name: 'extKeyUsage',
      serverAuth: extKeyUsage.includes('serverAuth'),
      clientAuth: extKeyUsage.includes('clientAuth'),
    });
  }
  const sans = options.sans ?? [];
  if (sans.length > 0) {
    extensions.push({ name: 'subjectAltName', altNames: sans.map(toAltName) });
  }
  extensions.push({ name: 'subjectKeyIdentifier' });
  cert.setExtensions(extensions);

  cert.sign(signingKey, forge.md.sha256.create());
  return {
    certPem: forge.pki.certificateToPem(cert),
    keyPem: keyPair.privateKey.export({ type: 'pkcs8', format: 'pem' }).toString(),
  };
}

/**
 * Generates a self-signed CA (RSA 2048, basicConstraints CA:true, keyCertSign+cRLSign).
 * Tests use a second CA to obtain "a certificate from another CA" that must not be trusted.
 */
export function generateCa(commonName: string = DEV_CA_COMMON_NAME, days?: number): CertificateAndKey {
  return issueCertificate({ commonName, isCa: true, days });
}

/**
 * Issues a client certificate (extKeyUsage clientAuth) signed by the given CA. Kubernetes reads
 * the CN as the user name and each O as a group.
 */
export function issueClientCertificate(options: IssueClientCertificateOptions): CertificateAndKey {
  return issueCertificate({
    issuer: { certPem: options.caCertPem, keyPem: options.caKeyPem },
    commonName: options.commonName,
    organizations: options.organizations,
    extKeyUsage: ['clientAuth'],
    days: options.days,
  });
}

/**
 * Issues a serving certificate (extKeyUsage serverAuth, CN `kmm-preflight`) signed by the given
 * CA, with {@link DEFAULT_SERVER_SANS} plus `extraSans`.
 */
export function issueServerCertificate(options: {
  readonly caCertPem: string;
  readonly caKeyPem: string;
  readonly extraSans?: readonly string[];
  readonly days?: number;
}): CertificateAndKey {
  return issueCertificate({
    issuer: { certPem: options.caCertPem, keyPem: options.caKeyPem },
    commonName: SERVER_COMMON_NAME,
    sans: serverSans(options.extraSans),
    extKeyUsage: ['serverAuth'],
    days: options.days,
  });
}

/**
 * Renders the kubeconfig for the admin user: cluster and context `kmm-preflight`, user
 * `kmm-preflight-admin`, all credentials embedded so the file works from any directory.
 */
export function renderKubeconfig(options: {
  readonly serverUrl: string;
  readonly caCertPem: string;
  readonly clientCertPem: string;
  readonly clientKeyPem: string;
}): string {
  const b64 = (pem: string): string => Buffer.from(pem, 'utf8').toString('base64');
  return stringifyYaml({
    apiVersion: 'v1',
    kind: 'Config',
    clusters: [
      {
        name: KUBECONFIG_CLUSTER_NAME,
        cluster: { server: options.serverUrl, 'certificate-authority-data': b64(options.caCertPem) },
      },
    ],
    users: [
      {
        name: KUBECONFIG_USER_NAME,
        user: { 'client-certificate-data': b64(options.clientCertPem), 'client-key-data': b64(options.clientKeyPem) },
      },
    ],
    contexts: [
      {
        name: KUBECONFIG_CLUSTER_NAME,
        context: { cluster: KUBECONFIG_CLUSTER_NAME, user: KUBECONFIG_USER_NAME },
      },
    ],
    'current-context': KUBECONFIG_CLUSTER_NAME,
    preferences: {},
  });
}

/**
 * Generates a fresh development PKI into `options.dir`, replacing any existing files: `ca.crt`,
 * `ca.key`, `server.crt`, `server.key`, `admin.crt`, `admin.key` and `kubeconfig`.
 *
 * Every file is written to a temporary name, flushed, then renamed, so a crash never leaves a
 * truncated file; {@link ensureDevPki} detects a set left mixed by a crash between renames
 * (certificates not signed by the CA on disk) and regenerates it.
 *
 * @throws Error on an invalid `serverUrl`, SAN or `days`, or when the directory is not writable.
 */
export async function generateDevPki(options: DevPkiOptions): Promise<DevPkiPaths> {
  // Validate before the (comparatively slow) key generation so bad usage fails fast.
  checkDevPkiOptions(options);
  const days = validityDays(options.days);
  const sans = serverSans(options.extraSans);

  // The three keys are generated concurrently on libuv's thread pool; sequentially they dominate the runtime.
  const generate = promisify(generateKeyPair);
  const [caKeys, serverKeys, adminKeys] = await Promise.all([
    generate('rsa', { modulusLength: RSA_BITS }),
    generate('rsa', { modulusLength: RSA_BITS }),
    generate('rsa', { modulusLength: RSA_BITS }),
  ]);

  const ca = issueCertificate({ commonName: DEV_CA_COMMON_NAME, isCa: true, days, keyPair: caKeys });
  const server = issueCertificate({
    issuer: ca,
    commonName: SERVER_COMMON_NAME,
    sans,
    extKeyUsage: ['serverAuth'],
    days,
    keyPair: serverKeys,
  });
  const admin = issueCertificate({
    issuer: ca,
    commonName: ADMIN_COMMON_NAME,
    organizations: [ADMIN_ORGANIZATION],
    extKeyUsage: ['clientAuth'],
    days,
    keyPair: adminKeys,
  });
  const kubeconfig = renderKubeconfig({
    serverUrl: options.serverUrl,
    caCertPem: ca.certPem,
    clientCertPem: admin.certPem,
    clientKeyPem: admin.keyPem,
  });

  const paths = devPkiPaths(options.dir);
  await mkdir(options.dir, { recursive: true, mode: 0o700 });
  // A crash between two renames leaves a certificate that no longer matches its key or the CA
  // on disk, which ensureDevPki detects and repairs by regenerating.
  await writeFilesAtomically(options.dir, [
    { path: paths.serverKey, data: server.keyPem, mode: 0o600 },
    { path: paths.serverCert, data: server.certPem, mode: 0o644 },
    { path: paths.adminKey, data: admin.keyPem, mode: 0o600 },
    { path: paths.adminCert, data: admin.certPem, mode: 0o644 },
    // Holds the admin private key, hence 0600 like the key files.
    { path: paths.kubeconfig, data: kubeconfig, mode: 0o600 },
    { path: paths.caKey, data: ca.keyPem, mode: 0o600 },
    { path: paths.caCert, data: ca.certPem, mode: 0o644 },
  ]);
  return paths;
}

/**
 * Makes sure a usable development PKI exists in `options.dir`, keeping existing credentials so
 * that anything already trusting the CA keeps working.
 *
 * - Any certificate or key missing, unreadable, expired, or not matching the CA or its own key:
 *   the whole PKI is regenerated (`created: true`).
 * - Otherwise only the kubeconfig is derived again, and rewritten when it is missing or its
 *   server URL or embedded credentials differ (`kubeconfigUpdated: true`). `extraSans` and `days`
 *   do not trigger regeneration of an existing PKI; use {@link generateDevPki} (`--force`) for that.
 */
export async function ensureDevPki(options: DevPkiOptions): Promise<EnsureDevPkiResult> {
  checkDevPkiOptions(options);
  const paths = devPkiPaths(options.dir);
  const problem = await checkExistingPki(paths);
  if (problem !== undefined) {
    await generateDevPki(options);
    return { created: true, kubeconfigUpdated: false, reason: problem, paths };
  }

  const [caCertPem, adminCertPem, adminKeyPem] = await Promise.all([
    readFile(paths.caCert, 'utf8'),
    readFile(paths.adminCert, 'utf8'),
    readFile(paths.adminKey, 'utf8'),
  ]);
  const current = await readKubeconfig(paths.kubeconfig);
  const b64 = (pem: string): string => Buffer.from(pem, 'utf8').toString('base64');
  const upToDate =
    current !== undefined &&
    current.server === options.serverUrl &&
    current.caData === b64(caCertPem) &&
    current.clientCertData === b64(adminCertPem) &&
    current.clientKeyData === b64(adminKeyPem);
  if (upToDate) {
    return { created: false, kubeconfigUpdated: false, paths };
  }
  const kubeconfig = renderKubeconfig({
    serverUrl: options.serverUrl,
    caCertPem,
    clientCertPem: adminCertPem,
    clientKeyPem: adminKeyPem,
  });
  await writeFilesAtomically(options.dir, [{ path: paths.kubeconfig, data: kubeconfig, mode: 0o600 }]);
  return { created: false, kubeconfigUpdated: true, paths };
}

/**
 * Throws when `serverUrl`, `extraSans` or `days` are invalid, without touching the filesystem;
 * lets a command tell bad usage apart from I/O failures.
 *
 * @throws Error with a one-sentence message naming the offending value.
 */
export function checkDevPkiOptions(options: DevPkiOptions): void {
  validateServerUrl(options.serverUrl);
  validityDays(options.days);
  serverSans(options.extraSans);
}

/** Returns why the existing certificates and keys cannot be kept, or undefined when they can. */
async function checkExistingPki(paths: DevPkiPaths): Promise<string | undefined> {
  const files = [paths.caCert, paths.caKey, paths.serverCert, paths.serverKey, paths.adminCert, paths.adminKey];
  let contents: string[];
  try {
    contents = await Promise.all(files.map((file) => readFile(file, 'utf8')));
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code;
    const file = (error as NodeJS.ErrnoException).path ?? 'a file';
    return code === 'ENOENT' ? `${file} is missing` : `cannot read ${file}: ${(error as Error).message}`;
  }
  const [caCertPem, caKeyPem, serverCertPem, serverKeyPem, adminCertPem, adminKeyPem] = contents as [
    string, string, string, string, string, string,
  ];
  try {
    const ca = new X509Certificate(caCertPem);
    const pairs: [string, X509Certificate, string][] = [
      [paths.caCert, ca, caKeyPem],
      [paths.serverCert, new X509Certificate(serverCertPem), serverKeyPem],
      [paths.adminCert, new X509Certificate(adminCertPem), adminKeyPem],
    ];
    const now = Date.now();
    for (const [file, cert, keyPem] of pairs) {
      if (!cert.checkPrivateKey(createPrivateKey(keyPem))) return `${file} does not match its private key`;
      if (!cert.verify(ca.publicKey)) return `${file} is not signed by ${paths.caCert}`;
      if (Date.parse(cert.validTo) <= now) return `${file} expired on ${cert.validTo}`;
    }
  } catch (error) {
    return `the existing PKI cannot be parsed: ${(error as Error).message}`;
  }
  return undefined;
}

interface KubeconfigSummary {
  readonly server: unknown;
  readonly caData: unknown;
  readonly clientCertData: unknown;
  readonly clientKeyData: unknown;
}

/** Reads the parts of our kubeconfig that ensureDevPki compares; undefined when absent or unparseable. */
async function readKubeconfig(path: string): Promise<KubeconfigSummary | undefined> {
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch {
    return undefined;
  }
  try {
    const doc = parseYaml(text) as {
      clusters?: { name?: string; cluster?: Record<string, unknown> }[];
      users?: { name?: string; user?: Record<string, unknown> }[];
    } | null;
    const cluster = doc?.clusters?.find((c) => c?.name === KUBECONFIG_CLUSTER_NAME)?.cluster;
    const user = doc?.users?.find((u) => u?.name === KUBECONFIG_USER_NAME)?.user;
    if (!cluster || !user) return undefined;
    return {
      server: cluster['server'],
      caData: cluster['certificate-authority-data'],
      clientCertData: user['client-certificate-data'],
      clientKeyData: user['client-key-data'],
    };
  } catch {
    return undefined;
  }
}

/**
 * Writes each file to a uniquely named temporary file in the same directory (so rename stays
 * atomic on one filesystem), fsyncs it, then renames all of them in order. Temporary files are
 * removed when anything fails before the renames.
 */
async function writeFilesAtomically(
  dir: string,
  files: readonly { readonly path: string; readonly data: string; readonly mode: number }[],
): Promise<void> {
  const suffix = `.tmp-${process.pid}-${randomBytes(6).toString('hex')}`;
  const written: { tmp: string; path: string }[] = [];
  try {
    for (const file of files) {
      const tmp = file.path + suffix;
      // 'wx' refuses to follow a pre-existing file or symlink at the temporary name; the mode is
      // applied at creation so a key is never readable by others, not even briefly.
      const handle = await open(tmp, 'wx', file.mode);
      written.push({ tmp, path: file.path });
      try {
        await handle.writeFile(file.data, 'utf8');
        await handle.datasync();
      } finally {
        await handle.close();
      }
    }
  } catch (error) {
    await Promise.all(written.map(({ tmp }) => rm(tmp, { force: true })));
    throw error;
  }
  for (const { tmp, path } of written) {
    await rename(tmp, path);
  }
  // Persist the renames themselves; not every platform allows opening a directory, and losing
  // this durability on those is acceptable for development credentials.
  try {
    const handle = await open(dir, 'r');
    try {
      await handle.sync();
    } finally {
      await handle.close();
    }
  } catch {
    // ignored, see above
  }
}

function serverSans(extraSans: readonly string[] = []): string[] {
  const result: string[] = [];
  const seen = new Set<string>();
  for (const san of [...DEFAULT_SERVER_SANS, ...extraSans]) {
    const normalized = normalizeSan(san);
    if (!seen.has(normalized)) {
      seen.add(normalized);
      result.push(normalized);
    }
  }
  return result;
}

// A DNS SAN may be a wildcard in the left-most label; labels are LDH (underscores tolerated, as
// Kubernetes tooling does).
const DNS_NAME = /^(\*\.)?([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)(\.[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)*$/;

function normalizeSan(san: string): string {
  const value = san.trim();
  if (value.includes('%')) {
    throw new Error(`invalid SAN ${JSON.stringify(san)}: IPv6 zone identifiers cannot appear in certificates`);
  }
  const family = isIP(value);
  if (family === 4) return value;
  if (family === 6) {
    // URL parsing yields the canonical compressed form and rewrites embedded IPv4 notation
    // (::ffff:1.2.3.4), which forge would otherwise misparse as an IPv4 address.
    return new URL(`http://[${value}]/`).hostname.slice(1, -1);
  }
  const dns = value.toLowerCase().replace(/\.$/, '');
  if (dns.length === 0 || dns.length > 253 || !DNS_NAME.test(dns)) {
    throw new Error(`invalid SAN ${JSON.stringify(san)}: not an IP address or DNS name`);
  }
  return dns;
}

function toAltName(san: string): { type: number; value?: string; ip?: string } {
  // GeneralName tags: 2 = dNSName, 7 = iPAddress.
  return isIP(san) === 0 ? { type: 2, value: san } : { type: 7, ip: san };
}

function randomSerialHex(): string {
  const bytes = randomBytes(16);
  // Serial numbers are DER INTEGERs: clearing the top bit keeps them positive (RFC 5280 requires
  // it), setting the next one keeps the encoding exactly 16 bytes with no leading zero octet.
  bytes[0] = ((bytes[0] ?? 0) & 0x7f) | 0x40;
  return bytes.toString('hex');
}

function validityDays(days: number | undefined): number {
  const value = days ?? DEFAULT_VALIDITY_DAYS;
  if (!Number.isFinite(value) || value <= 0) {
    throw new Error(`invalid validity ${String(days)}: days must be a positive number`);
  }
  return value;
}

function validateServerUrl(serverUrl: string): void {
  let url: URL;
  try {
    url = new URL(serverUrl);
  } catch {
    throw new Error(`invalid server URL ${JSON.stringify(serverUrl)}`);
  }
  if (url.protocol !== 'https:') {
    throw new Error(`invalid server URL ${JSON.stringify(serverUrl)}: the server only serves https`);
  }
}

/** forge only reads PKCS#1 RSA keys; the issuing helpers accept any PEM Node understands. */
function pkcs1Pem(keyPem: string): string {
  return createPrivateKey(keyPem).export({ type: 'pkcs1', format: 'pem' }).toString();
}
