/**
 * The binaries of the test control plane (see docs/adr/0005-test-control-plane.md), envtest-style:
 *
 * - `KUBEBUILDER_ASSETS` set: `kube-apiserver` and `etcd` from that directory (for example what
 *   `setup-envtest use` prints), so the suite runs against any Kubernetes version.
 * - Otherwise etcd is Debian's `etcd-server`, and kube-apiserver v1.20.2 is built once from
 *   Debian bookworm's `kubernetes` source package and cached outside the repository in
 *   `${KMM_PREFLIGHT_CACHE:-/var/cache/kmm-preflight}/kube-apiserver-v1.20.2/kube-apiserver`.
 *   The build takes minutes; a lock file keeps concurrent test processes from building twice.
 *
 * `node test/helpers/kube-binaries.ts` only ensures the binaries (CI and tap's `before` script
 * run it, so the build happens before any test file's timeout starts).
 */
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { createWriteStream, rmSync, type WriteStream } from 'node:fs';
import { access, constants, copyFile, chmod, mkdir, open, readdir, readFile, rename, rm, stat, writeFile } from 'node:fs/promises';
import { hostname } from 'node:os';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { ensureDebianBinary } from './debian.ts';

/** The Kubernetes version Debian bookworm's `kubernetes` source package builds. */
export const KUBE_APISERVER_VERSION = 'v1.20.2';
/** The Debian suite that carries it. */
const SOURCE_SUITE = 'bookworm';
const SOURCE_PACKAGE = 'kubernetes';
const DEFAULT_CACHE = '/var/cache/kmm-preflight';
const REFLECT2_DIR = '/usr/share/gocode/src/github.com/modern-go/reflect2';
const DEBIAN_KEYRING = '/usr/share/keyrings/debian-archive-keyring.gpg';

const LOCK_WAIT_MS = 60 * 60_000;
const STALE_LOCK_MS = 3 * 60 * 60_000;
const MAKE_TIMEOUT_MS = 60 * 60_000;

function log(message: string): void {
  process.stderr.write(`[kube-binaries] ${message}\n`);
}

/** The directory of the cache: `$KMM_PREFLIGHT_CACHE`, default `/var/cache/kmm-preflight`. */
export function cacheRoot(): string {
  return resolve(process.env['KMM_PREFLIGHT_CACHE'] || DEFAULT_CACHE);
}

/** Where the built kube-apiserver lives (whether or not it exists yet). */
export function cachedKubeApiserverPath(): string {
  return join(cacheRoot(), `kube-apiserver-${KUBE_APISERVER_VERSION}`, 'kube-apiserver');
}

function assetsDir(): string | undefined {
  const dir = process.env['KUBEBUILDER_ASSETS'];
  return dir ? resolve(dir) : undefined;
}

async function isExecutable(path: string): Promise<boolean> {
  try {
    await access(path, constants.X_OK);
    return (await stat(path)).isFile();
  } catch {
    return false;
  }
}

async function fromAssets(dir: string, binary: string): Promise<string> {
  const path = join(dir, binary);
  if (!(await isExecutable(path))) {
    throw unavailable(
      `KUBEBUILDER_ASSETS=${dir} has no executable ${binary}: point it at a directory holding kube-apiserver and etcd ` +
        '(e.g. the output of `setup-envtest use -p path`), or unset it to use the cached Debian build',
    );
  }
  return path;
}

/** The etcd binary: `$KUBEBUILDER_ASSETS/etcd`, or Debian's etcd-server. */
export async function ensureEtcdBinary(): Promise<string> {
  const dir = assetsDir();
  if (dir) return fromAssets(dir, 'etcd');
  try {
    return await ensureDebianBinary('etcd', 'etcd-server');
  } catch (err) {
    throw unavailable(`${(err as Error).message}; or set KUBEBUILDER_ASSETS to a directory holding kube-apiserver and etcd`, err);
  }
}

let pending: Promise<string> | undefined;

/**
 * The kube-apiserver binary: `$KUBEBUILDER_ASSETS/kube-apiserver`, or the cached Debian build,
 * building it first when missing (minutes; progress on stderr).
 * @throws Error saying what to install, or to set KUBEBUILDER_ASSETS, when it cannot be built here.
 */
export function ensureKubeApiserver(): Promise<string> {
  const dir = assetsDir();
  if (dir) return fromAssets(dir, 'kube-apiserver');
  pending ??= ensureCached().finally(() => {
    pending = undefined;
  });
  return pending;
}

/** Errors that mean "no binaries on this machine" rather than "the build broke". */
const UNAVAILABLE = Symbol('kube-binaries unavailable');

/** True when `err` says the binaries cannot be had here (no root, no package, no assets), not that a build failed. */
export function isUnavailable(err: unknown): boolean {
  return typeof err === 'object' && err !== null && UNAVAILABLE in err;
}

function unavailable(message: string, cause?: unknown): Error {
  const err = new Error(message, cause === undefined ? undefined : { cause });
  Object.defineProperty(err, UNAVAILABLE, { value: true });
  return err;
}

function cannotBuild(reason: string, cause?: unknown): Error {
  return unavailable(
    `kube-apiserver ${KUBE_APISERVER_VERSION} is not cached at ${cachedKubeApiserverPath()} and cannot be built here: ${reason}. ` +
      'Run `node test/helpers/kube-binaries.ts` once as root (it installs golang-1.19-go, rsync, make, dpkg-dev and ' +
      "golang-github-modern-go-reflect2-dev with apt and builds from Debian's kubernetes source package), " +
      'or set KUBEBUILDER_ASSETS to a directory holding kube-apiserver and etcd',
    cause,
  );
}

async function ensureCached(): Promise<string> {
  const target = cachedKubeApiserverPath();
  if (await isExecutable(target)) return target;
  const root = cacheRoot();
  try {
    await mkdir(root, { recursive: true, mode: 0o755 });
    await access(root, constants.W_OK);
  } catch (err) {
    throw cannotBuild(`the cache directory ${root} is not writable (set KMM_PREFLIGHT_CACHE to another one)`, err);
  }
  const release = await acquireLock(join(root, `kube-apiserver-${KUBE_APISERVER_VERSION}.lock`), target);
  if (release === 'built') return target;
  try {
    if (await isExecutable(target)) return target; // built by the previous lock holder
    await build(root, target);
    return target;
  } finally {
    await release();
  }
}

// ---------------------------------------------------------------------------------------------
// Clean-ups that must also happen when the process exits or is interrupted mid-build (kill the
// build's process groups, remove the work directory and the lock), run synchronously, last
// registered first. On SIGINT/SIGTERM the signal is raised again afterwards, so the process still
// dies of it.

const abortHandlers: (() => void)[] = [];

function runAbortHandlers(): void {
  for (const handler of abortHandlers.splice(0).reverse()) {
    try {
      handler();
    } catch {
      // best effort while exiting
    }
  }
}

function onSignal(signal: NodeJS.Signals): void {
  runAbortHandlers();
  process.removeListener('SIGINT', onSignal);
  process.removeListener('SIGTERM', onSignal);
  process.removeListener('exit', runAbortHandlers);
  process.kill(process.pid, signal);
}

/** Registers `handler` for exit and SIGINT/SIGTERM; returns its unregistration. */
function onAbort(handler: () => void): () => void {
  if (abortHandlers.length === 0) {
    process.on('exit', runAbortHandlers);
    process.on('SIGINT', onSignal);
    process.on('SIGTERM', onSignal);
  }
  abortHandlers.push(handler);
  return () => {
    const i = abortHandlers.indexOf(handler);
    if (i >= 0) abortHandlers.splice(i, 1);
    if (abortHandlers.length === 0) {
      process.removeListener('exit', runAbortHandlers);
      process.removeListener('SIGINT', onSignal);
      process.removeListener('SIGTERM', onSignal);
    }
  };
}

// ---------------------------------------------------------------------------------------------
// Lock file: created exclusively, holding {pid, host, since}; a lock whose process is gone (same
// host) or that is older than STALE_LOCK_MS is taken over.

interface LockInfo {
  readonly pid: number;
  readonly host: string;
  readonly since: number;
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

async function acquireLock(lockPath: string, target: string): Promise<(() => Promise<void>) | 'built'> {
  const deadline = Date.now() + LOCK_WAIT_MS;
  let announced = false;
  for (;;) {
    try {
      const handle = await open(lockPath, 'wx', 0o644);
      try {
        await handle.writeFile(JSON.stringify({ pid: process.pid, host: hostname(), since: Date.now() } satisfies LockInfo));
      } finally {
        await handle.close();
      }
      const unregister = onAbort(() => rmSync(lockPath, { force: true }));
      return async () => {
        unregister();
        await rm(lockPath, { force: true });
      };
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
    }
    if (await isExecutable(target)) return 'built';
    let info: LockInfo | undefined;
    let raw = '';
    try {
      raw = await readFile(lockPath, 'utf8');
      info = JSON.parse(raw) as LockInfo;
    } catch {
      // being written right now, or removed meanwhile: look again shortly
    }
    if (info) {
      const stale = (info.host === hostname() && !alive(info.pid)) || Date.now() - info.since > STALE_LOCK_MS;
      if (stale) {
        // Only if it is still that lock: another waiter may have replaced it with its own meanwhile.
        if ((await readFile(lockPath, 'utf8').catch(() => '')) === raw) {
          log(`removing the stale lock ${lockPath} (pid ${info.pid} on ${info.host} is gone)`);
          await rm(lockPath, { force: true });
        }
        continue;
      }
      if (!announced) {
        log(`waiting for pid ${info.pid} on ${info.host}, which is building kube-apiserver (lock ${lockPath})`);
        announced = true;
      }
    }
    if (Date.now() > deadline) {
      throw new Error(`timed out after ${LOCK_WAIT_MS / 60_000} min waiting for the kube-apiserver build lock ${lockPath}; remove it if no build is running`);
    }
    await new Promise((r) => setTimeout(r, 2000));
  }
}

// ---------------------------------------------------------------------------------------------
// Running commands, bounded, with output to a log file.

interface RunOptions {
  readonly cwd?: string;
  readonly env?: NodeJS.ProcessEnv;
  readonly timeoutMs: number;
  readonly logFile?: WriteStream;
  /** Lines of output to echo to stderr as progress. */
  readonly progress?: (line: string) => boolean;
}

const running = new Set<number>();

function killRunning(): void {
  for (const pid of running) {
    try {
      process.kill(-pid, 'SIGKILL');
    } catch {
      // already gone
    }
  }
}

function runCommand(command: string, args: readonly string[], options: RunOptions): Promise<string> {
  return new Promise((resolveRun, reject) => {
    // Its own process group, so a timeout or a signal to us ends make's whole tree of go processes.
    const child = spawn(command, args, { cwd: options.cwd, env: options.env ?? process.env, stdio: ['ignore', 'pipe', 'pipe'], detached: true });
    let tail = '';
    let partial = '';
    const onData = (d: Buffer) => {
      const text = d.toString();
      options.logFile?.write(text);
      tail = (tail + text).slice(-8000);
      if (options.progress) {
        const lines = (partial + text).split('\n');
        partial = lines.pop() ?? '';
        for (const line of lines) if (options.progress(line)) log(line.trim());
      }
    };
    child.stdout.on('data', onData);
    child.stderr.on('data', onData);
    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      try {
        process.kill(-child.pid!, 'SIGKILL');
      } catch {
        child.kill('SIGKILL');
      }
    }, options.timeoutMs);
    if (child.pid !== undefined) running.add(child.pid);
    const describe = `${command} ${args.join(' ')}`;
    child.on('error', (err) => {
      clearTimeout(timer);
      reject(new Error(`${describe} could not run: ${err.message}`));
    });
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      if (child.pid !== undefined) running.delete(child.pid);
      if (code === 0) return resolveRun(tail);
      const why = timedOut ? `timed out after ${Math.round(options.timeoutMs / 1000)} s` : `failed (${signal ?? `exit ${code}`})`;
      reject(new Error(`${describe} ${why}; last output:\n${tail.split('\n').slice(-40).join('\n')}`));
    });
  });
}

const APT_ENV = { ...process.env, DEBIAN_FRONTEND: 'noninteractive' };

let systemAptUpdated = false;

/** Installs a Debian package with the system's apt (root only), updating the lists once if needed. */
async function aptInstall(pkg: string): Promise<void> {
  if (process.getuid?.() !== 0) throw cannotBuild(`the Debian package ${pkg} is missing (apt-get install ${pkg}) and this is not root`);
  log(`apt-get install ${pkg}`);
  const install = () =>
    runCommand('apt-get', ['install', '-y', '-qq', '-o', 'DPkg::Lock::Timeout=300', pkg], { env: APT_ENV, timeoutMs: 900_000 });
  try {
    await install();
  } catch (err) {
    if (systemAptUpdated) throw cannotBuild(`apt-get install ${pkg} failed`, err);
    await runCommand('apt-get', ['update', '-qq', '-o', 'DPkg::Lock::Timeout=300'], { env: APT_ENV, timeoutMs: 300_000 });
    systemAptUpdated = true;
    try {
      await install();
    } catch (err2) {
      throw cannotBuild(`apt-get install ${pkg} failed`, err2);
    }
  }
}

async function wrapMissing<T>(what: Promise<T>): Promise<T> {
  try {
    return await what;
  } catch (err) {
    throw cannotBuild((err as Error).message, err);
  }
}

/** Debian's Go: on PATH, or golang-1.19-go's /usr/lib/go-1.19, installed when missing. */
async function ensureGo(): Promise<string> {
  for (const dir of (process.env['PATH'] ?? '').split(':')) {
    if (dir && (await isExecutable(join(dir, 'go')))) return join(dir, 'go');
  }
  const candidates = ['/usr/lib/go-1.19/bin/go', '/usr/lib/go/bin/go'];
  for (const c of candidates) if (await isExecutable(c)) return c;
  try {
    await aptInstall('golang-1.19-go');
    if (await isExecutable(candidates[0]!)) return candidates[0]!;
  } catch (err) {
    log(`golang-1.19-go is not installable (${(err as Error).message.split('\n')[0]}); trying golang-go`);
  }
  return wrapMissing(ensureDebianBinary('go', 'golang-go'));
}

async function exists(path: string): Promise<boolean> {
  return access(path).then(
    () => true,
    () => false,
  );
}

async function ensureReflect2(): Promise<void> {
  const probe = join(REFLECT2_DIR, 'reflect2.go');
  if (await exists(probe)) return;
  await aptInstall('golang-github-modern-go-reflect2-dev');
  if (!(await exists(probe))) throw cannotBuild(`golang-github-modern-go-reflect2-dev is installed but ${probe} is missing`);
}

// ---------------------------------------------------------------------------------------------
// The machine's Debian archive, for a private deb-src entry.

interface AptEntry {
  readonly types: string[];
  readonly uris: string[];
  readonly suites: string[];
  readonly components: string[];
  readonly signedBy?: string;
  readonly file: string;
}

/** Parses deb822 `.sources` paragraphs (continuation lines kept for inline Signed-By keys). */
export function parseDeb822(text: string, file: string): AptEntry[] {
  const entries: AptEntry[] = [];
  for (const paragraph of text.split(/\n\s*\n/)) {
    const fields = new Map<string, string>();
    let key: string | undefined;
    for (const line of paragraph.split('\n')) {
      if (line.startsWith('#')) continue;
      if (/^\s/.test(line) && key) {
        fields.set(key, `${fields.get(key)}\n${line}`);
        continue;
      }
      const m = /^([A-Za-z0-9-]+):\s*(.*)$/.exec(line);
      if (m) {
        key = m[1]!.toLowerCase();
        fields.set(key, m[2]!.trim());
      }
    }
    if (!fields.has('uris') || (fields.get('enabled') ?? 'yes').toLowerCase() === 'no') continue;
    const words = (k: string) => (fields.get(k) ?? '').split(/\s+/).filter(Boolean);
    const signedBy = fields.get('signed-by');
    entries.push({ types: words('types'), uris: words('uris'), suites: words('suites'), components: words('components'), ...(signedBy ? { signedBy } : {}), file });
  }
  return entries;
}

/** Parses one-line `sources.list` entries: `deb [options] uri suite component...`. */
export function parseOneLine(text: string, file: string): AptEntry[] {
  const entries: AptEntry[] = [];
  for (const raw of text.split('\n')) {
    const line = raw.replace(/#.*$/, '').trim();
    const m = /^(deb|deb-src)\s+(?:\[([^\]]*)\]\s+)?(\S+)\s+(\S+)\s*(.*)$/.exec(line);
    if (!m) continue;
    const signedBy = /(?:^|\s)signed-by=(\S+)/.exec(m[2] ?? '')?.[1];
    entries.push({ types: [m[1]!], uris: [m[3]!], suites: [m[4]!], components: (m[5] ?? '').split(/\s+/).filter(Boolean), ...(signedBy ? { signedBy } : {}), file });
  }
  return entries;
}

async function machineAptEntries(): Promise<AptEntry[]> {
  const entries: AptEntry[] = [];
  const read = async (path: string) => readFile(path, 'utf8').catch(() => undefined);
  const main = await read('/etc/apt/sources.list');
  if (main !== undefined) entries.push(...parseOneLine(main, '/etc/apt/sources.list'));
  const dir = '/etc/apt/sources.list.d';
  const names = await readdir(dir).catch(() => [] as string[]);
  for (const name of names.sort()) {
    const path = join(dir, name);
    // apt itself reads only these two extensions (e.g. `*.list.disabled` is ignored).
    if (name.endsWith('.sources')) entries.push(...parseDeb822((await read(path)) ?? '', path));
    else if (name.endsWith('.list')) entries.push(...parseOneLine((await read(path)) ?? '', path));
  }
  return entries;
}

/** Picks the machine's Debian archive entry: suite `bookworm` preferred, else a plain release suite. */
export function pickDebianArchive(entries: readonly AptEntry[]): { uri: string; signedBy?: string } | undefined {
  const plain = (s: string) => /^[a-z]+$/.test(s) && !['stable', 'testing', 'unstable', 'sid', 'experimental'].includes(s);
  const usable = entries.filter(
    (e) => e.components.includes('main') && e.uris.some((u) => /^https?:\/\//.test(u) && !/security/.test(u)),
  );
  const best =
    usable.find((e) => e.suites.includes(SOURCE_SUITE)) ??
    usable.find((e) => e.suites.some(plain) && e.uris.some((u) => /\/debian\/?$/.test(u))) ??
    usable.find((e) => e.suites.some(plain));
  if (!best) return undefined;
  const uri = best.uris.find((u) => /^https?:\/\//.test(u) && !/security/.test(u))!;
  return { uri, ...(best.signedBy ? { signedBy: best.signedBy } : {}) };
}

// ---------------------------------------------------------------------------------------------
// The build.

function goArch(): string {
  if (process.arch === 'x64') return 'amd64';
  if (process.arch === 'arm64') return 'arm64';
  throw cannotBuild(`no Kubernetes build platform for the Node architecture ${process.arch}`);
}

async function build(root: string, target: string): Promise<void> {
  const started = Date.now();
  const elapsed = () => `${Math.round((Date.now() - started) / 1000)} s`;
  log(`kube-apiserver ${KUBE_APISERVER_VERSION} is not cached; building it from Debian's ${SOURCE_PACKAGE} source package into ${target} (takes several minutes)`);

  // We hold the lock, so any other build directory was left by a killed build.
  for (const name of await readdir(root)) {
    if (name.startsWith('build-')) await rm(join(root, name), { recursive: true, force: true });
  }

  // Tools first, so a machine that cannot build fails before downloading anything.
  const go = await ensureGo();
  await wrapMissing(ensureDebianBinary('rsync', 'rsync'));
  await wrapMissing(ensureDebianBinary('make', 'make'));
  await wrapMissing(ensureDebianBinary('dpkg-source', 'dpkg-dev'));
  await ensureReflect2();
  const platform = `linux/${goArch()}`;

  const archive = pickDebianArchive(await machineAptEntries());
  if (!archive) {
    throw cannotBuild('no Debian archive entry (suite bookworm or another release, component main) in /etc/apt/sources.list or /etc/apt/sources.list.d/');
  }

  const work = join(root, `build-${process.pid}-${randomBytes(4).toString('hex')}`);
  const logPath = join(root, `kube-apiserver-${KUBE_APISERVER_VERSION}.build.log`);
  await mkdir(work, { recursive: true });
  const logFile = createWriteStream(logPath);
  const unregister = onAbort(() => {
    killRunning();
    rmSync(work, { recursive: true, force: true });
  });
  try {
    // A private apt configuration holding only the deb-src entry: the system's lists stay untouched.
    const apt = join(work, 'apt');
    await mkdir(join(apt, 'lists', 'partial'), { recursive: true });
    await mkdir(join(apt, 'cache', 'archives', 'partial'), { recursive: true });
    let signedBy = archive.signedBy;
    if (signedBy === undefined && (await exists(DEBIAN_KEYRING))) signedBy = DEBIAN_KEYRING;
    const sourcesFile = join(apt, 'kmm-preflight.sources');
    await writeFile(
      sourcesFile,
      ['Types: deb-src', `URIs: ${archive.uri}`, `Suites: ${SOURCE_SUITE}`, 'Components: main', ...(signedBy ? [`Signed-By: ${signedBy}`] : [])].join('\n') + '\n',
    );
    const aptOptions = [
      '-o', `Dir::Etc::SourceList=${sourcesFile}`,
      '-o', 'Dir::Etc::SourceParts=/nonexistent',
      '-o', `Dir::State::Lists=${join(apt, 'lists')}`,
      '-o', `Dir::Cache=${join(apt, 'cache')}`,
    ];
    log(`[${elapsed()}] apt-get update (private lists, deb-src ${archive.uri} ${SOURCE_SUITE} main)`);
    await runCommand('apt-get', [...aptOptions, 'update'], { env: APT_ENV, timeoutMs: 300_000, logFile });
    const src = join(work, 'src');
    await mkdir(src);
    log(`[${elapsed()}] apt-get source --download-only ${SOURCE_PACKAGE}`);
    await runCommand('apt-get', [...aptOptions, 'source', '--download-only', SOURCE_PACKAGE], { cwd: src, env: APT_ENV, timeoutMs: 900_000, logFile });
    const dsc = (await readdir(src)).find((n) => n.endsWith('.dsc'));
    if (!dsc) throw new Error(`apt-get source left no .dsc in ${src}`);
    log(`[${elapsed()}] unpacking ${dsc}`);
    const tree = join(src, 'kubernetes');
    await runCommand('dpkg-source', ['-x', dsc, tree], { cwd: src, timeoutMs: 600_000, logFile });

    // The vendored reflect2 1.0.1 crashes on Go >= 1.18; Debian's 1.0.2 is a drop-in replacement.
    const vendored = join(tree, 'vendor', 'github.com', 'modern-go', 'reflect2');
    const isCode = (n: string) => (n.endsWith('.go') || n.endsWith('.s')) && !n.endsWith('_test.go');
    for (const n of (await readdir(vendored)).filter(isCode)) await rm(join(vendored, n));
    const replacements = (await readdir(REFLECT2_DIR)).filter(isCode);
    for (const n of replacements) await copyFile(join(REFLECT2_DIR, n), join(vendored, n));
    log(`[${elapsed()}] replaced the vendored reflect2 with Debian's (${replacements.length} files)`);

    const goVersion = (await runCommand(go, ['version'], { timeoutMs: 30_000 })).trim();
    log(`[${elapsed()}] make WHAT=cmd/kube-apiserver KUBE_BUILD_PLATFORMS=${platform} with ${goVersion} (full output: ${logPath})`);
    const goDir = join(go, '..');
    const home = join(work, 'home');
    await mkdir(home);
    const env: NodeJS.ProcessEnv = {
      ...process.env,
      PATH: `${goDir}:${process.env['PATH'] ?? '/usr/bin:/bin'}`,
      HOME: home,
      GOCACHE: join(work, 'gocache'),
      GOPATH: join(work, 'gopath'),
      GOTOOLCHAIN: 'local',
      CGO_ENABLED: '0',
      GOPROXY: 'off',
    };
    delete env['GOFLAGS'];
    delete env['GOROOT'];
    const heartbeat = setInterval(() => log(`[${elapsed()}] still building...`), 60_000);
    try {
      await runCommand('make', ['WHAT=cmd/kube-apiserver', `KUBE_BUILD_PLATFORMS=${platform}`], {
        cwd: tree,
        env,
        timeoutMs: MAKE_TIMEOUT_MS,
        logFile,
        progress: (line) => line.startsWith('+++'),
      });
    } finally {
      clearInterval(heartbeat);
    }
    const candidates = [join(tree, '_output', 'bin', 'kube-apiserver'), join(tree, '_output', 'local', 'bin', ...platform.split('/'), 'kube-apiserver')];
    let built: string | undefined;
    for (const c of candidates) if (await isExecutable(c)) built = built ?? c;
    if (!built) throw new Error(`make succeeded but left no kube-apiserver in ${candidates.join(' or ')}`);
    const version = (await runCommand(built, ['--version'], { timeoutMs: 30_000 })).trim();
    if (!version.includes(KUBE_APISERVER_VERSION)) throw new Error(`the built kube-apiserver reports ${JSON.stringify(version)}, expected ${KUBE_APISERVER_VERSION}`);

    // Into the cache atomically: copy next to the final name, then rename.
    const finalDir = join(target, '..');
    await mkdir(finalDir, { recursive: true, mode: 0o755 });
    const tmp = `${target}.tmp-${process.pid}-${randomBytes(4).toString('hex')}`;
    await copyFile(built, tmp);
    await chmod(tmp, 0o755);
    await rename(tmp, target);
    await writeFile(
      join(finalDir, 'BUILD-INFO'),
      `${version}\nbuilt ${new Date().toISOString()} in ${elapsed()} on ${hostname()} from ${dsc} (${archive.uri} ${SOURCE_SUITE}) with ${goVersion}\n`,
    );
    log(`[${elapsed()}] done: ${target} (${version})`);
  } catch (err) {
    throw new Error(`building kube-apiserver ${KUBE_APISERVER_VERSION} failed (log: ${logPath}): ${(err as Error).message}`, { cause: err });
  } finally {
    unregister();
    await new Promise<void>((r) => logFile.end(() => r()));
    await rm(work, { recursive: true, force: true });
  }
}

// ---------------------------------------------------------------------------------------------
// CLI: ensure both binaries, print their paths.

// When tap runs this as its `before` script (TAP_BEFORE is set), a machine that cannot have the
// binaries only warns, so test files that do not need a control plane still run; the control-plane
// tests then fail with the same message. A build that breaks fails the run.
if (process.argv[1] && resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  try {
    const apiserver = await ensureKubeApiserver();
    const etcd = await ensureEtcdBinary();
    log(`kube-apiserver: ${apiserver}`);
    log(`etcd: ${etcd}`);
  } catch (err) {
    const soft = isUnavailable(err) && !!process.env['TAP_BEFORE'];
    log(`${soft ? 'WARNING (the control-plane tests will fail)' : 'ERROR'}: ${(err as Error).message}`);
    if (!soft) process.exitCode = 1;
  }
}
