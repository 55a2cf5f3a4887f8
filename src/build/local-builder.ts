/**
 * The Build stage on this machine: Debian's buildah, for stand-alone mode and the `check` command,
 * doing what KMM's kaniko Job does in a cluster: the Dockerfile alone as the context, the build
 * arguments in order, `build.secrets` mounted read-only at `/run/secrets/<name>` for RUN steps,
 * the `imageRepoSecret` as the only registry credentials, and a push when `pushBuiltImage` is set.
 *
 * Builds run as child processes of this one (rootful buildah, chroot isolation, vfs storage in a
 * directory of their own, so nothing needs overlayfs, cgroups or a daemon). The state lives in
 * memory: a restarted process starts its builds anew.
 */
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pino, type Logger } from 'pino';
import { logTail, type Builder, type BuildOutcome, type BuildRequest } from './types.ts';

export const DEFAULT_LOCAL_BUILD_TIMEOUT_MS = 30 * 60_000;
export const DEFAULT_MAX_CONCURRENT_BUILDS = 2;
export const DEFAULT_KILL_GRACE_MS = 5_000;

export interface LocalBuilderOptions {
  /** The buildah binary: a path, or a name looked up on PATH. Default `buildah`. */
  readonly buildah?: string;
  /**
   * Buildah's storage (`--root` and `--runroot` below it), kept between builds so base images are
   * stored once. Default: a fresh directory under the system temp directory, removed by `close`.
   */
  readonly storageDir?: string;
  /** A build and its push not finished after this long are stopped (`BuildTimedOut`). Default 30 min. */
  readonly timeoutMs?: number;
  readonly logger?: Logger;
  /** Builds running at once; later ones wait, reported as queued. Default 2. */
  readonly maxConcurrentBuilds?: number;
  /** Between SIGTERM (buildah then removes its working container) and SIGKILL. Default 5 s. */
  readonly killGraceMs?: number;
}

/** Where buildah stopped, from its `[stage/stages] STEP n/m: INSTRUCTION` lines. */
interface Step {
  readonly step: string;
  readonly instruction: string;
  readonly stage?: string;
}

interface Build {
  readonly req: BuildRequest;
  /** A tag of this build alone, so builds of one destination never untag each other's images. */
  readonly localTag: string;
  phase: 'queued' | 'running' | 'done';
  outcome?: BuildOutcome;
  startedAt?: number;
  /** The step buildah is at, for Running reasons. */
  step?: Step | undefined;
  child?: ChildProcess;
  /** Replaced, released or closed: its result is not published. */
  stopped: boolean;
  /** The image is in local storage under `localTag` (removed on release). */
  imageBuilt: boolean;
  readonly finished: PromiseWithResolvers<void>;
}

interface ExecResult {
  readonly exitCode: number | null;
  readonly signal: NodeJS.Signals | null;
  readonly timedOut: boolean;
  readonly spawnError?: Error;
  readonly output: string;
  readonly lastStep?: Step;
  readonly errorLine?: string;
}

type Availability = { readonly ok: true; readonly version: string } | { readonly ok: false; readonly reason: string };

const STEP_RE = /^(?:\[(\d+\/\d+)\] )?STEP (\d+\/\d+): (.*)$/;
const ERROR_RE = /^(?:Error: |error: )(.*)$/;
/** buildah quotes the instruction without escaping its own quotes: the known step is cut first. */
const AT_STEP_RE = /^(?:error )?building at STEP ".*?": (.*)$/s;
const PUSH_PREFIX_RE = /^pushing image "[^"]*" to "[^"]*": /;
/** Secret names are DNS subdomains; keys are `[-._a-zA-Z0-9]+`: both are safe as path segments. */
const SECRET_NAME_RE = /^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$/;
const SECRET_KEY_RE = /^[-._a-zA-Z0-9]+$/;
/** Output kept for a failure's reason; older lines are dropped. */
const OUTPUT_KEEP_BYTES = 64 * 1024;
/** Shorter strings are not masked in the output: masking `1` everywhere would hide the log. */
const MIN_MASK_LENGTH = 4;
/**
 * What buildah may read from this process's environment. Its other variables (REGISTRY_AUTH_FILE,
 * BUILDAH_LAYERS, STORAGE_DRIVER, ...) would change the build behind the flags' back.
 */
const ENV_PASSED = ['PATH', 'HOME', 'TMPDIR', 'LANG', 'LC_ALL', 'http_proxy', 'https_proxy', 'no_proxy', 'HTTP_PROXY', 'HTTPS_PROXY', 'NO_PROXY', 'CONTAINERS_REGISTRIES_CONF', 'CONTAINERS_CONF'];

function duration(ms: number): string {
  if (ms < 1000) return `${ms} ms`;
  if (ms < 10_000) return `${Math.round(ms / 100) / 10} s`;
  if (ms < 120_000) return `${Math.round(ms / 1000)} s`;
  return `${Math.round(ms / 60_000)} min`;
}

function describeStep(s: Step): string {
  const instruction = s.instruction.length > 120 ? `${s.instruction.slice(0, 119)}…` : s.instruction;
  return `step ${s.step}${s.stage !== undefined ? ` of stage ${s.stage}` : ''} (${instruction})`;
}

function errorMessage(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

/** Every string of the request that must not reach a log line or a reason: secret values, credentials. */
function secretStrings(req: BuildRequest, secrets: ReadonlyMap<string, Readonly<Record<string, Buffer>>>): string[] {
  const out = new Set<string>();
  const add = (s: unknown) => {
    if (typeof s !== 'string') return;
    for (const part of [s, ...s.split(/\r?\n/)]) {
      const v = part.trim();
      if (v.length >= MIN_MASK_LENGTH) out.add(v);
    }
  };
  for (const data of secrets.values()) for (const value of Object.values(data)) add(value.toString('utf8'));
  if (req.dockerConfigJson !== undefined) {
    try {
      const doc = JSON.parse(req.dockerConfigJson) as { auths?: Record<string, Record<string, unknown>> };
      for (const entry of Object.values(doc.auths ?? {})) {
        add(entry['auth']);
        add(entry['password']);
        add(entry['identitytoken']);
        add(entry['registrytoken']);
        if (typeof entry['auth'] === 'string') {
          const decoded = Buffer.from(entry['auth'], 'base64').toString('utf8');
          add(decoded);
          add(decoded.slice(decoded.indexOf(':') + 1));
        }
      }
    } catch {
      // Not JSON: buildah will say so, without quoting it.
    }
  }
  // Longest first, so a value containing another is masked whole.
  return [...out].sort((a, b) => b.length - a.length);
}

function maskWith(strings: readonly string[]): (line: string) => string {
  if (strings.length === 0) return (line) => line;
  return (line) => {
    for (const s of strings) if (line.includes(s)) line = line.split(s).join('[REDACTED]');
    return line;
  };
}

/** buildah's combined output, line by line: masked, bounded, with the last step and error seen. */
class OutputCollector {
  private readonly lines: string[] = [];
  private bytes = 0;
  private partial = '';
  lastStep: Step | undefined;
  errorLine: string | undefined;
  private readonly mask: (line: string) => string;
  private readonly onLine: (line: string) => void;

  constructor(mask: (line: string) => string, onLine: (line: string) => void) {
    this.mask = mask;
    this.onLine = onLine;
  }

  push(chunk: Buffer): void {
    const text = this.partial + chunk.toString('utf8');
    const parts = text.split(/\r?\n/);
    this.partial = parts.pop() ?? '';
    // A line without end (progress output) is kept at a bounded length.
    if (this.partial.length > 16 * 1024) {
      parts.push(this.partial);
      this.partial = '';
    }
    for (const p of parts) this.line(p);
  }

  end(): void {
    if (this.partial !== '') this.line(this.partial);
    this.partial = '';
  }

  text(): string {
    return this.lines.join('\n');
  }

  private line(raw: string): void {
    const line = this.mask(raw);
    const step = STEP_RE.exec(line);
    if (step) this.lastStep = { step: step[2]!, instruction: step[3]!, ...(step[1] !== undefined ? { stage: step[1] } : {}) };
    const error = ERROR_RE.exec(line);
    if (error) this.errorLine = error[1]!;
    this.lines.push(line);
    this.bytes += Buffer.byteLength(line) + 1;
    while (this.bytes > OUTPUT_KEEP_BYTES && this.lines.length > 1) this.bytes -= Buffer.byteLength(this.lines.shift()!) + 1;
    this.onLine(line);
  }
}

/**
 * A {@link Builder} running Debian's buildah here. Missing buildah makes every build
 * `Unavailable` (`BuilderUnavailable`), never passed.
 */
export function createLocalBuilder(options: LocalBuilderOptions = {}): Builder {
  const buildah = options.buildah ?? 'buildah';
  const timeoutMs = Math.max(1, options.timeoutMs ?? DEFAULT_LOCAL_BUILD_TIMEOUT_MS);
  const maxConcurrent = Math.max(1, Math.floor(options.maxConcurrentBuilds ?? DEFAULT_MAX_CONCURRENT_BUILDS));
  const killGraceMs = options.killGraceMs ?? DEFAULT_KILL_GRACE_MS;
  const log = (options.logger ?? pino({ level: 'silent' })).child({ component: 'local-builder' });

  const env: Record<string, string> = {};
  for (const name of ENV_PASSED) {
    const value = process.env[name];
    if (value !== undefined) env[name] = value;
  }
  env['PATH'] ??= '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin';

  const builds = new Map<string, Build>();
  const queue: Build[] = [];
  const listeners: ((key: string) => void)[] = [];
  const stopping = new Set<Promise<void>>();
  let active = 0;
  let closed = false;
  let closing: Promise<void> | undefined;
  let availability: Promise<Availability> | undefined;
  let storage: Promise<{ readonly dir: string; readonly owned: boolean }> | undefined;

  function checkAvailability(): Promise<Availability> {
    availability ??= new Promise<Availability>((resolve) => {
      execFile(buildah, ['--version'], { timeout: 30_000, env }, (err, stdout) => {
        if (!err) {
          const version = stdout.trim();
          log.info({ buildah, version }, 'buildah found');
          resolve({ ok: true, version });
          return;
        }
        const code = (err as NodeJS.ErrnoException).code;
        const which = buildah === 'buildah' ? '' : `${buildah} not found; `;
        const reason =
          code === 'ENOENT'
            ? `buildah is not installed on this machine (${which}Debian: apt-get install buildah); the build was not run`
            : `buildah (${buildah}) does not run here: ${err.message.trim()}; the build was not run`;
        log.warn({ buildah, error: err.message }, 'buildah is unavailable: builds are reported as unavailable');
        resolve({ ok: false, reason });
      });
    });
    return availability;
  }

  function storageDir(): Promise<{ readonly dir: string; readonly owned: boolean }> {
    storage ??= (async () => {
      if (options.storageDir !== undefined) {
        await mkdir(options.storageDir, { recursive: true, mode: 0o700 });
        return { dir: options.storageDir, owned: false };
      }
      return { dir: await mkdtemp(join(tmpdir(), 'kmm-preflight-buildah-')), owned: true };
    })();
    // A failure is not cached: the next build tries again.
    storage.catch(() => (storage = undefined));
    return storage;
  }

  function globalFlags(dir: string): string[] {
    return ['--root', join(dir, 'root'), '--runroot', join(dir, 'runroot'), '--storage-driver', 'vfs'];
  }

  function notify(key: string): void {
    for (const listener of listeners) {
      try {
        listener(key);
      } catch (err) {
        log.warn({ key, error: errorMessage(err) }, 'a build update listener threw');
      }
    }
  }

  /** Stops a build's process group: SIGTERM (buildah cleans up), SIGKILL after the grace time. */
  function terminate(child: ChildProcess): void {
    const pid = child.pid;
    if (pid === undefined || child.exitCode !== null || child.signalCode !== null) return;
    const signalGroup = (signal: NodeJS.Signals) => {
      try {
        process.kill(-pid, signal);
      } catch {
        // The group is gone.
      }
    };
    signalGroup('SIGTERM');
    const timer = setTimeout(() => signalGroup('SIGKILL'), killGraceMs);
    timer.unref();
    child.once('exit', () => clearTimeout(timer));
  }

  /** Runs buildah with `args` until it exits or `deadline` passes; output masked with `mask`. */
  function exec(b: Build, args: readonly string[], deadline: number, mask: (line: string) => string): Promise<ExecResult> {
    return new Promise<ExecResult>((resolve) => {
      const collector: OutputCollector = new OutputCollector(mask, (line) => {
        b.step = collector.lastStep;
        log.debug({ key: b.req.key, line }, 'buildah output');
      });
      // Its own process group (detached), so the RUN steps' processes stop with it.
      const child = spawn(buildah, args, { detached: true, stdio: ['ignore', 'pipe', 'pipe'], env });
      b.child = child;
      let timedOut = false;
      let spawnError: Error | undefined;
      let settled = false;
      const timer = setTimeout(
        () => {
          timedOut = true;
          terminate(child);
        },
        // setTimeout fires at once for delays past 2^31 - 1 ms.
        Math.min(Math.max(0, deadline - Date.now()), 2 ** 31 - 1),
      );
      const finish = (exitCode: number | null, signal: NodeJS.Signals | null) => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        b.child = undefined;
        collector.end();
        resolve({
          exitCode,
          signal,
          timedOut,
          ...(spawnError ? { spawnError } : {}),
          output: collector.text(),
          ...(collector.lastStep ? { lastStep: collector.lastStep } : {}),
          ...(collector.errorLine !== undefined ? { errorLine: collector.errorLine } : {}),
        });
      };
      child.stdout!.on('data', (d: Buffer) => collector.push(d));
      child.stderr!.on('data', (d: Buffer) => collector.push(d));
      child.once('error', (err) => {
        spawnError = err;
        if (child.pid === undefined) finish(null, null);
      });
      child.once('exit', () => {
        // Nothing of a finished build may live on (a RUN step's background process, say).
        if (child.pid !== undefined) {
          try {
            process.kill(-child.pid, 'SIGKILL');
          } catch {
            // Already gone.
          }
        }
      });
      child.once('close', (code, signal) => finish(code, signal));
      if (b.stopped) terminate(child);
    });
  }

  async function removeImage(b: Build): Promise<void> {
    if (!b.imageBuilt) return;
    b.imageBuilt = false;
    const { dir } = await storageDir();
    await new Promise<void>((resolve) => {
      execFile(buildah, [...globalFlags(dir), 'rmi', b.localTag], { timeout: 120_000, env }, (err, _stdout, stderr) => {
        if (err) log.warn({ key: b.req.key, image: b.localTag, error: String(stderr).trim() || err.message }, 'could not remove a built image');
        else log.debug({ key: b.req.key, image: b.localTag }, 'built image removed');
        resolve();
      });
    });
  }

  /** Writes the build's inputs, runs the build (and the push), and says how it ended. */
  async function perform(b: Build): Promise<BuildOutcome> {
    const req = b.req;
    const secrets = new Map<string, Readonly<Record<string, Buffer>>>();
    for (const name of req.secrets) {
      if (!SECRET_NAME_RE.test(name)) {
        return { state: 'Failed', code: 'BuildSecretInvalid', reason: `the build cannot run: ${JSON.stringify(name)} (build.secrets) is not a Secret name; the build was not run` };
      }
      const data = req.secretData?.(name);
      if (data === undefined) {
        return {
          state: 'Failed',
          code: 'BuildSecretMissing',
          reason: `the build cannot run: its Secret ${req.namespace}/${name} (build.secrets) does not exist; the build was not run`,
        };
      }
      const bad = Object.keys(data).find((k) => !SECRET_KEY_RE.test(k) || k === '.' || k === '..');
      if (bad !== undefined) {
        return { state: 'Failed', code: 'BuildSecretInvalid', reason: `the build cannot run: Secret ${req.namespace}/${name} has a key that is not a file name; the build was not run` };
      }
      secrets.set(name, data);
    }
    const mask = maskWith(secretStrings(req, secrets));
    const { dir } = await storageDir();
    const started = b.startedAt ?? Date.now();
    const deadline = started + timeoutMs;

    // mkdtemp makes it 0700: the credentials and secrets below are not reachable by other users.
    const work = await mkdtemp(join(tmpdir(), 'kmm-preflight-build-'));
    try {
      const context = join(work, 'context');
      await mkdir(context);
      await writeFile(join(context, 'Dockerfile'), req.dockerfile);
      // Always an authfile, empty without imageRepoSecret: this machine's own registry logins
      // must not make a build pass here that the kaniko Job could not run.
      const authfile = join(work, 'auth.json');
      await writeFile(authfile, req.dockerConfigJson ?? '{"auths":{}}', { mode: 0o600 });
      const volumes: string[] = [];
      for (const [name, data] of secrets) {
        // 0755/0644 as Kubernetes mounts Secret volumes by default (a RUN step after `USER 1000`
        // can read them there too); the 0700 work directory keeps them from this host's users.
        const secretDir = join(work, 'secrets', name);
        await mkdir(secretDir, { recursive: true, mode: 0o755 });
        for (const [key, value] of Object.entries(data)) await writeFile(join(secretDir, key), value, { mode: 0o644 });
        volumes.push('--volume', `${secretDir}:/run/secrets/${name}:ro`);
      }
      if (b.stopped) return { state: 'Error', code: 'BuildStopped', reason: 'the build was stopped' };

      const insecurePull = req.baseImageRegistryTLS.insecure || req.baseImageRegistryTLS.insecureSkipTLSVerify;
      const buildArgs = [
        ...globalFlags(dir),
        'build',
        '--isolation',
        'chroot',
        // Docker manifests, as kaniko pushes them; OCI would also drop HEALTHCHECK, SHELL, ...
        '--format',
        'docker',
        '--layers=false',
        // As kaniko, which keeps no images: a base image is fetched again (its stored layers are
        // reused), so a registry the cluster could not reach fails here too.
        '--pull=always',
        `--tls-verify=${!insecurePull}`,
        '--authfile',
        authfile,
        ...req.buildArgs.flatMap((a) => ['--build-arg', `${a.name}=${a.value}`]),
        ...volumes,
        '-f',
        join(context, 'Dockerfile'),
        '-t',
        b.localTag,
        context,
      ];
      log.info({ key: req.key, destination: req.destination, push: req.push, kernel: req.kernel }, 'build started');
      const built = await exec(b, buildArgs, deadline, mask);
      // An image may have been committed even when the process was stopped at its end.
      b.imageBuilt = built.exitCode === 0;
      if (b.stopped) return { state: 'Error', code: 'BuildStopped', reason: 'the build was stopped' };
      if (built.timedOut) {
        const where = built.lastStep ? ` (stopped at ${describeStep(built.lastStep)})` : '';
        return { state: 'Failed', code: 'BuildTimedOut', reason: `build did not finish within ${duration(timeoutMs)}${where}; last lines:\n${logTail(built.output)}` };
      }
      if (built.spawnError) {
        return { state: 'Error', code: 'BuilderError', reason: `buildah could not be started: ${built.spawnError.message}` };
      }
      if (built.exitCode !== 0) {
        const raw = built.errorLine ?? (built.signal ? `buildah was killed by ${built.signal}` : `buildah exited with status ${built.exitCode}`);
        const known = built.lastStep ? [`building at STEP "${built.lastStep.instruction}": `, `error building at STEP "${built.lastStep.instruction}": `].find((p) => raw.startsWith(p)) : undefined;
        const why = known !== undefined ? raw.slice(known.length) : (AT_STEP_RE.exec(raw)?.[1] ?? raw);
        const where = built.lastStep ? ` at ${describeStep(built.lastStep)}` : '';
        return { state: 'Failed', code: 'BuildFailed', reason: `build failed${where}: ${why}; last lines:\n${logTail(built.output)}` };
      }
      if (!req.push) {
        return {
          state: 'Succeeded',
          image: req.destination,
          pushed: false,
          reason: `image ${req.destination} was built with buildah and not pushed (pushBuiltImage is false)`,
        };
      }

      const insecurePush = req.registryTLS.insecure || req.registryTLS.insecureSkipTLSVerify;
      const digestFile = join(work, 'digest');
      const pushArgs = [
        ...globalFlags(dir),
        'push',
        `--tls-verify=${!insecurePush}`,
        '--authfile',
        authfile,
        '--digestfile',
        digestFile,
        b.localTag,
        `docker://${req.destination}`,
      ];
      const pushed = await exec(b, pushArgs, deadline, mask);
      if (b.stopped) return { state: 'Error', code: 'BuildStopped', reason: 'the build was stopped' };
      if (pushed.timedOut) {
        return { state: 'Failed', code: 'BuildTimedOut', reason: `build and push did not finish within ${duration(timeoutMs)} (stopped while pushing ${req.destination}); last lines:\n${logTail(pushed.output)}` };
      }
      if (pushed.spawnError) {
        return { state: 'Error', code: 'BuilderError', reason: `buildah could not be started: ${pushed.spawnError.message}` };
      }
      if (pushed.exitCode !== 0) {
        const why = (pushed.errorLine ?? `buildah push exited with status ${pushed.exitCode ?? pushed.signal}`).replace(PUSH_PREFIX_RE, '');
        return { state: 'Failed', code: 'PushFailed', reason: `the built image could not be pushed to ${req.destination}: ${why}` };
      }
      let digest = '';
      try {
        digest = (await readFile(digestFile, 'utf8')).trim();
      } catch {
        // Older buildah without --digestfile output: the reason goes without it.
      }
      return {
        state: 'Succeeded',
        image: req.destination,
        pushed: true,
        reason: `image ${req.destination} was built with buildah and pushed${digest ? ` (${digest})` : ''}`,
      };
    } finally {
      await rm(work, { recursive: true, force: true }).catch((err: unknown) => log.warn({ key: req.key, error: errorMessage(err) }, 'could not remove a build directory'));
    }
  }

  async function execute(b: Build): Promise<void> {
    let outcome: BuildOutcome;
    try {
      outcome = await perform(b);
    } catch (err) {
      outcome = { state: 'Error', code: 'BuilderError', reason: `the local build could not be run: ${errorMessage(err)}` };
    }
    active--;
    b.phase = 'done';
    if (!b.stopped) {
      b.outcome = outcome;
      const level = outcome.state === 'Succeeded' ? 'info' : 'warn';
      log[level]({ key: b.req.key, destination: b.req.destination, state: outcome.state, code: 'code' in outcome ? outcome.code : undefined, durationMs: Date.now() - (b.startedAt ?? Date.now()) }, 'build finished');
    }
    b.finished.resolve();
    pump();
    if (!b.stopped) notify(b.req.key);
  }

  function pump(): void {
    while (active < maxConcurrent && queue.length > 0) {
      const b = queue.shift()!;
      if (b.stopped) continue;
      active++;
      b.phase = 'running';
      b.startedAt = Date.now();
      void execute(b);
    }
  }

  /** Stops `b` (queued or running), waits for its process, removes its image. */
  function stop(b: Build): Promise<void> {
    b.stopped = true;
    const i = queue.indexOf(b);
    if (i >= 0) {
      queue.splice(i, 1);
      b.finished.resolve();
    } else if (b.child) {
      terminate(b.child);
    }
    const p = b.finished.promise.then(() => removeImage(b));
    stopping.add(p);
    void p.finally(() => stopping.delete(p));
    return p;
  }

  function status(b: Build): BuildOutcome {
    if (b.phase === 'done' && b.outcome) return b.outcome;
    if (b.phase === 'queued') {
      const builds = active === 1 ? '1 local build is' : `${active} local builds are`;
      return { state: 'Running', reason: `build of ${b.req.destination} is queued: ${builds} running (maxConcurrentBuilds ${maxConcurrent})` };
    }
    const ms = Date.now() - (b.startedAt ?? Date.now());
    const at = b.step ? ` at ${describeStep(b.step)}` : '';
    return { state: 'Running', reason: `buildah is building ${b.req.destination} for kernel ${b.req.kernel}${at}, ${ms < 1000 ? 'started just now' : `${duration(ms)} so far`}` };
  }

  function waitUnlessAborted<T>(promise: Promise<T>, signal: AbortSignal | undefined): Promise<T> {
    if (!signal) return promise;
    return new Promise<T>((resolve, reject) => {
      const onAbort = () => reject(signal.reason);
      signal.addEventListener('abort', onAbort, { once: true });
      promise.then(
        (v) => {
          signal.removeEventListener('abort', onAbort);
          resolve(v);
        },
        (err: unknown) => {
          signal.removeEventListener('abort', onAbort);
          reject(err);
        },
      );
    });
  }

  const closedOutcome: BuildOutcome = { state: 'Error', code: 'BuilderClosed', reason: 'the local builder is shut down; the build was not run' };

  return {
    kind: 'local',

    async run(req, signal) {
      signal?.throwIfAborted();
      if (closed) return closedOutcome;
      const available = await waitUnlessAborted(checkAvailability(), signal);
      if (!available.ok) return { state: 'Unavailable', code: 'BuilderUnavailable', reason: available.reason };
      if (closed) return closedOutcome;

      const current = builds.get(req.key);
      if (current && current.req.fingerprint === req.fingerprint) return status(current);
      if (current) {
        // Another Module version or Dockerfile: the earlier build no longer answers.
        log.info({ key: req.key }, 'the Module or its Dockerfile changed: replacing the build');
        builds.delete(req.key);
        void stop(current);
      }
      const b: Build = {
        req,
        localTag: `localhost/kmm-preflight-build/${randomBytes(8).toString('hex')}:latest`,
        phase: 'queued',
        stopped: false,
        imageBuilt: false,
        finished: Promise.withResolvers<void>(),
      };
      builds.set(req.key, b);
      queue.push(b);
      pump();
      return status(b);
    },

    async release(key) {
      const b = builds.get(key);
      if (!b) return;
      builds.delete(key);
      await stop(b);
    },

    onUpdate(listener) {
      listeners.push(listener);
    },

    close() {
      closing ??= (async () => {
        closed = true;
        const all = [...builds.values()];
        builds.clear();
        await Promise.all([...all.map(stop), ...stopping]);
        if (storage) {
          const s = await storage.catch(() => undefined);
          if (s?.owned) await rm(s.dir, { recursive: true, force: true }).catch((err: unknown) => log.warn({ dir: s.dir, error: errorMessage(err) }, 'could not remove the build storage'));
        }
      })();
      return closing;
    },
  };
}
