/**
 * The local builder against real tools: Debian's buildah (chroot isolation, vfs storage) building
 * from a static-busybox base image in Debian's docker-registry on loopback, pushing back to it,
 * and the Image stage reading what was pushed.
 */
import { access, mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { Writable } from 'node:stream';
import { pino } from 'pino';
import t, { type Test } from 'tap';
import { createLocalBuilder, type LocalBuilderOptions } from '../../src/build/local-builder.ts';
import type { Builder, BuildOutcome, BuildRequest } from '../../src/build/types.ts';
import { createImageStage } from '../../src/engine/image-stage.ts';
import { createMemoryLayerCache } from '../../src/engine/layer-cache.ts';
import { createRegistryClient } from '../../src/registry/client.ts';
import { flagValue, recordingBuildah, waitGroupGone, type RecordingBuildah } from '../helpers/buildah.ts';
import { hostPlatform, pushBusyboxImage } from '../helpers/busybox-image.ts';
import { buildModuleObject } from '../helpers/kmod-fixtures.ts';
import { accessFor, startRegistry, type TestRegistry } from '../helpers/registry.ts';

const runFile = promisify(execFile);
const K = '6.1.0-18-amd64';
const MODULE = 'kmm_ci_a';
const SECRET_VALUE = 'tok-9f8e7d6c5b4a';
const TEST_TIMEOUT = 120_000;

const dir = await mkdtemp(join(tmpdir(), 'local-builder-test-'));
t.teardown(() => rm(dir, { recursive: true, force: true }));
const registry = await startRegistry();
t.teardown(() => registry.stop());
const buildah = await recordingBuildah(dir);

const moduleObject = await buildModuleObject({ name: MODULE, vermagic: `${K} SMP preempt mod_unload modversions` });
await pushBusyboxImage(registry, 'base/busybox:1', { files: [{ path: 'src/', type: 'directory' }, { path: `src/${MODULE}.ko`, content: moduleObject }] });
const BASE = `${registry.host}/base/busybox:1`;

// Everything the builders log, at debug level, to prove no secret reaches a log line.
const logLines: string[] = [];
const logger = pino(
  { level: 'debug' },
  new Writable({
    write(chunk: Buffer, _enc, cb) {
      logLines.push(chunk.toString());
      cb();
    },
  }),
);

function newBuilder(tt: Test | typeof t, options: LocalBuilderOptions = {}): Builder {
  const builder = createLocalBuilder({ buildah: buildah.path, storageDir: join(dir, 'storage'), logger, ...options });
  tt.teardown(() => builder.close());
  return builder;
}

// One builder (and its storage) serves most tests, as in stand-alone mode.
const shared = newBuilder(t);
const updates: string[] = [];
shared.onUpdate((key) => updates.push(key));

const insecure = { insecure: true, insecureSkipTLSVerify: false };
let n = 0;

function request(over: Partial<BuildRequest> & Pick<BuildRequest, 'dockerfile' | 'destination'>): BuildRequest {
  n++;
  return {
    key: `pfv/upgrade|default/module-${n}`,
    owner: { apiVersion: 'kmm-preflight.sigs.x-k8s.io/v1beta2', kind: 'PreflightValidation', name: 'upgrade', uid: 'uid-1' },
    namespace: 'default',
    moduleName: MODULE,
    kernel: K,
    dockerfileConfigMap: 'build-dockerfile',
    buildArgs: [
      { name: 'KERNEL_FULL_VERSION', value: K },
      { name: 'KERNEL_VERSION', value: K },
      { name: 'MOD_NAME', value: MODULE },
      { name: 'MOD_NAMESPACE', value: 'default' },
    ],
    secrets: [],
    push: true,
    registryTLS: insecure,
    baseImageRegistryTLS: insecure,
    fingerprint: `fp-${n}`,
    ...over,
  };
}

/** Asks again until the build is no longer Running. */
async function settle(builder: Builder, req: BuildRequest, timeoutMs = 90_000): Promise<BuildOutcome> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const outcome = await builder.run(req);
    if (outcome.state !== 'Running') return outcome;
    if (Date.now() > deadline) throw new Error(`build ${req.key} still running after ${timeoutMs} ms: ${outcome.reason}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

async function manifestStatus(reg: TestRegistry, repoTag: string): Promise<number> {
  const [repo, tag] = repoTag.split(':');
  const res = await fetch(`${reg.url}/v2/${repo}/manifests/${tag}`, {
    headers: { accept: 'application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.manifest.v1+json' },
  });
  await res.body?.cancel();
  return res.status;
}

async function exists(path: string): Promise<boolean> {
  return access(path).then(
    () => true,
    () => false,
  );
}

/** Local images of the shared storage, by name. */
async function localImages(): Promise<string[]> {
  const storage = join(dir, 'storage');
  const { stdout } = await runFile(buildah.path, ['--root', join(storage, 'root'), '--runroot', join(storage, 'runroot'), '--storage-driver', 'vfs', 'images', '--format', '{{.Name}}:{{.Tag}}']);
  return stdout.split('\n').filter((l) => l !== '');
}

/** Waits until the recording shows `count` more calls of `command` than `before`; returns the new ones. */
async function newCalls(command: string, before: number, count = 1): Promise<Awaited<ReturnType<RecordingBuildah['calls']>>> {
  const deadline = Date.now() + 30_000;
  for (;;) {
    const calls = await buildah.callsOf(command);
    if (calls.length >= before + count) return calls.slice(before);
    if (Date.now() > deadline) throw new Error(`expected ${count} new buildah ${command} call(s)`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

const MODULE_DOCKERFILE = `FROM ${BASE}
ARG KERNEL_VERSION
ARG MOD_NAME
RUN mkdir -p /opt/lib/modules/\${KERNEL_VERSION}/extra && cp /src/\${MOD_NAME}.ko /opt/lib/modules/\${KERNEL_VERSION}/extra/ && depmod -b /opt \${KERNEL_VERSION}
`;

t.test('built and pushed: the image holds the module where the Image stage finds it for the kernel', { timeout: TEST_TIMEOUT }, async (t) => {
  const req = request({ dockerfile: MODULE_DOCKERFILE, destination: `${registry.host}/drivers/${MODULE}:${K}` });
  const buildsBefore = (await buildah.callsOf('build')).length;
  const first = await shared.run(req);
  t.equal(first.state, 'Running', 'a started build reports Running at once');
  t.match(first.reason, `buildah is building ${req.destination} for kernel ${K}`);
  const outcome = await settle(shared, req);
  t.equal(outcome.state, 'Succeeded', `state (${'reason' in outcome ? outcome.reason : ''})`);
  if (outcome.state !== 'Succeeded') return;
  t.equal(outcome.image, req.destination);
  t.equal(outcome.pushed, true);
  t.match(outcome.reason, new RegExp(`^image ${req.destination} was built with buildah and pushed \\(sha256:[0-9a-f]{64}\\)$`));
  t.ok(updates.includes(req.key), 'onUpdate named the key when the build finished');

  const [build] = await newCalls('build', buildsBefore);
  t.ok(build, 'one buildah build');
  for (const flag of ['--isolation', '--storage-driver', '--root', '--runroot', '--authfile', '-f', '-t']) t.ok(build!.args.includes(flag), `build passes ${flag}`);
  t.equal(flagValue(build!, '--isolation'), 'chroot');
  t.equal(flagValue(build!, '--storage-driver'), 'vfs');
  t.ok(build!.args.includes('--tls-verify=false'), 'base images from an insecure registry');
  t.same(
    build!.args.flatMap((a, i) => (build!.args[i - 1] === '--build-arg' ? [a] : [])),
    req.buildArgs.map((a) => `${a.name}=${a.value}`),
    'build arguments in order',
  );
  t.notOk(await exists(flagValue(build!, '--authfile')!), 'the authfile is removed after the build');

  const client = createRegistryClient({ retries: 1, baseBackoffMs: 10 });
  t.teardown(() => client.close());
  const stage = createImageStage({ registry: client, cache: createMemoryLayerCache() });
  const verdict = await stage.run({ image: req.destination, moduleName: MODULE, dirName: '/opt', kernel: K, access: accessFor(registry), platform: hostPlatform() });
  t.equal(verdict.status, 'True', `Image stage: ${verdict.reason}`);
  t.equal(verdict.code, 'Verified');
  t.match(verdict.reason, `extra/${MODULE}.ko`, 'busybox depmod wrote a modules.dep listing the module');

  t.same(await shared.run(req), outcome, 'the finished outcome is kept until release');
  t.equal((await buildah.callsOf('build')).length, buildsBefore + 1, 'asking again starts no build');
  const localTag = flagValue(build!, '-t')!;
  t.ok((await localImages()).includes(localTag), 'the built image is in local storage until release');
  await shared.release(req.key);
  t.notOk((await localImages()).includes(localTag), 'release removed the built image');
  t.equal((await shared.run(req)).state, 'Running', 'after release, the same request builds anew');
  await settle(shared, req);
  await shared.release(req.key);
});

t.test('a failing RUN step: BuildFailed naming the step, its error and the last lines', { timeout: TEST_TIMEOUT }, async (t) => {
  const dockerfile = `FROM ${BASE}\nARG MOD_NAME\nRUN echo "building module $MOD_NAME" && false\nRUN echo never\n`;
  const req = request({ dockerfile, destination: `${registry.host}/drivers/failing:1` });
  const outcome = await settle(shared, req);
  t.equal(outcome.state, 'Failed');
  if (outcome.state !== 'Failed') return;
  t.equal(outcome.code, 'BuildFailed');
  t.match(outcome.reason, /^build failed at step 3\/4 \(RUN echo "building module \$MOD_NAME" && false\): exit status 1; last lines:\n/);
  t.match(outcome.reason, `building module ${MODULE}`, 'the build argument reached the RUN step');
  t.notMatch(outcome.reason, 'never', 'later steps did not run');
  t.equal(await manifestStatus(registry, 'drivers/failing:1'), 404, 'nothing pushed');
  await shared.release(req.key);
});

t.test('a base image that cannot be pulled fails at its FROM step', { timeout: TEST_TIMEOUT }, async (t) => {
  const req = request({ dockerfile: `FROM ${registry.host}/base/missing:1\nRUN true\n`, destination: `${registry.host}/drivers/nobase:1` });
  const outcome = await settle(shared, req);
  t.equal(outcome.state, 'Failed');
  if (outcome.state === 'Failed') {
    t.equal(outcome.code, 'BuildFailed');
    t.match(outcome.reason, new RegExp(`^build failed at step 1/2 \\(FROM ${registry.host}/base/missing:1\\): `));
  }
  await shared.release(req.key);
});

t.test('without push: Succeeded, not pushed, and the registry has no such tag', { timeout: TEST_TIMEOUT }, async (t) => {
  const req = request({ dockerfile: MODULE_DOCKERFILE, destination: `${registry.host}/drivers/nopush:1`, push: false });
  const pushesBefore = (await buildah.callsOf('push')).length;
  const outcome = await settle(shared, req);
  t.same(outcome, {
    state: 'Succeeded',
    image: req.destination,
    pushed: false,
    reason: `image ${req.destination} was built with buildah and not pushed (pushBuiltImage is false)`,
  });
  t.equal((await buildah.callsOf('push')).length, pushesBefore, 'no buildah push');
  t.equal(await manifestStatus(registry, 'drivers/nopush:1'), 404);
  await shared.release(req.key);
});

t.test('build.secrets are mounted read-only at /run/secrets/<name>; their values never show', { timeout: TEST_TIMEOUT }, async (t) => {
  const secretData = (name: string) => (name === 's1' ? { token: Buffer.from(SECRET_VALUE), other: Buffer.from('second-value') } : undefined);
  const buildsBefore = (await buildah.callsOf('build')).length;
  const ok = request({
    dockerfile: `FROM ${BASE}\nRUN test "$(cat /run/secrets/s1/token)" = "$(echo ${Buffer.from(SECRET_VALUE).toString('base64')} | base64 -d)" && test -f /run/secrets/s1/other && ! touch /run/secrets/s1/new\n`,
    destination: `${registry.host}/drivers/secret:1`,
    push: false,
    secrets: ['s1'],
    secretData,
  });
  const outcome = await settle(shared, ok);
  t.equal(outcome.state, 'Succeeded', `the RUN step read the secret (${'reason' in outcome ? outcome.reason : ''})`);
  const [build] = await newCalls('build', buildsBefore);
  const volume = flagValue(build!, '--volume')!;
  t.match(volume, /:\/run\/secrets\/s1:ro$/, 'mounted read-only');
  t.notOk(await exists(volume.split(':')[0]!), 'the secret files are removed after the build');
  await shared.release(ok.key);

  const leaky = request({
    dockerfile: `FROM ${BASE}\nRUN cat /run/secrets/s1/token && echo && false\n`,
    destination: `${registry.host}/drivers/secret:2`,
    push: false,
    secrets: ['s1'],
    secretData,
  });
  const failed = await settle(shared, leaky);
  t.equal(failed.state, 'Failed');
  t.notMatch(failed.reason, SECRET_VALUE, 'a secret printed by the build is not in the reason');
  t.match(failed.reason, '[REDACTED]');
  await shared.release(leaky.key);

  const missing = request({ dockerfile: `FROM ${BASE}\nRUN true\n`, destination: `${registry.host}/drivers/secret:3`, secrets: ['s1', 'gone'], secretData });
  const buildsBeforeMissing = (await buildah.callsOf('build')).length;
  const refused = await settle(shared, missing);
  t.same(refused, {
    state: 'Failed',
    code: 'BuildSecretMissing',
    reason: 'the build cannot run: its Secret default/gone (build.secrets) does not exist; the build was not run',
  });
  t.equal((await buildah.callsOf('build')).length, buildsBeforeMissing, 'buildah was not run');
  await shared.release(missing.key);
  t.notOk(logLines.some((l) => l.includes(SECRET_VALUE)), 'no log line holds the secret');
});

t.test('one build per key and fingerprint; a new fingerprint replaces a running build', { timeout: TEST_TIMEOUT }, async (t) => {
  const builder = newBuilder(t);
  const seen: string[] = [];
  builder.onUpdate((key) => seen.push(key));
  const slow = request({ dockerfile: `FROM ${BASE}\nRUN sleep 1\n`, destination: `${registry.host}/drivers/once:1`, push: false });
  const buildsBefore = (await buildah.callsOf('build')).length;
  const [a, b] = await Promise.all([builder.run(slow), builder.run(slow)]);
  t.equal(a.state, 'Running');
  t.equal(b.state, 'Running');
  t.equal((await builder.run(slow)).state, 'Running', 'still running when asked again');
  const done = await settle(builder, slow);
  t.equal(done.state, 'Succeeded');
  t.equal((await buildah.callsOf('build')).length, buildsBefore + 1, 'three calls, one buildah process');
  t.same(seen, [slow.key], 'onUpdate fired once, with the key');

  const again = { ...slow, fingerprint: `${slow.fingerprint}-changed` };
  t.equal((await builder.run(again)).state, 'Running', 'another fingerprint starts anew instead of answering the old outcome');
  t.equal((await settle(builder, again)).state, 'Succeeded');
  t.equal((await buildah.callsOf('build')).length, buildsBefore + 2);

  // A running build is stopped when its request changes.
  const long = { ...slow, dockerfile: `FROM ${BASE}\nRUN sleep 30\n`, fingerprint: 'long' };
  t.equal((await builder.run(long)).state, 'Running');
  const [longCall] = await newCalls('build', buildsBefore + 2);
  await new Promise((r) => setTimeout(r, 500));
  const quick = { ...slow, fingerprint: 'quick' };
  seen.length = 0;
  t.equal((await builder.run(quick)).state, 'Running');
  t.ok(await waitGroupGone(longCall!.pid, 10_000), 'the replaced build was stopped');
  t.equal((await settle(builder, quick)).state, 'Succeeded');
  t.same(seen, [quick.key], 'only the replacing build reported');
  await builder.release(slow.key);
});

t.test('builds beyond maxConcurrentBuilds wait, reported as queued', { timeout: TEST_TIMEOUT }, async (t) => {
  const builder = newBuilder(t, { maxConcurrentBuilds: 1 });
  const first = request({ dockerfile: `FROM ${BASE}\nRUN sleep 1\n`, destination: `${registry.host}/drivers/q:1`, push: false });
  const second = request({ dockerfile: `FROM ${BASE}\nRUN true\n`, destination: `${registry.host}/drivers/q:2`, push: false });
  t.equal((await builder.run(first)).state, 'Running');
  const queued = await builder.run(second);
  t.equal(queued.state, 'Running');
  t.match(queued.reason, /^build of .*drivers\/q:2 is queued: 1 local build is running \(maxConcurrentBuilds 1\)$/);
  t.equal((await settle(builder, first)).state, 'Succeeded');
  t.equal((await settle(builder, second)).state, 'Succeeded');
});

t.test('a build past its timeout is stopped: BuildTimedOut, and its processes are gone', { timeout: TEST_TIMEOUT }, async (t) => {
  const builder = newBuilder(t, { timeoutMs: 3_000 });
  const req = request({ dockerfile: `FROM ${BASE}\nRUN sleep 30\n`, destination: `${registry.host}/drivers/slow:1` });
  const buildsBefore = (await buildah.callsOf('build')).length;
  const started = Date.now();
  const outcome = await settle(builder, req);
  t.ok(Date.now() - started < 15_000, 'stopped well before the sleep ended');
  t.equal(outcome.state, 'Failed');
  if (outcome.state === 'Failed') {
    t.equal(outcome.code, 'BuildTimedOut');
    t.match(outcome.reason, /^build did not finish within 3 s \(stopped at step 2\/2 \(RUN sleep 30\)\); last lines:\n/);
  }
  const [call] = await newCalls('build', buildsBefore);
  t.ok(await waitGroupGone(call!.pid), 'no process of the build is left');
  t.equal(await manifestStatus(registry, 'drivers/slow:1'), 404);
});

t.test('registry credentials: pulls and pushes with the imageRepoSecret, PushFailed without', { timeout: TEST_TIMEOUT }, async (t) => {
  const secured = await startRegistry({ auth: 'htpasswd' });
  t.teardown(() => secured.stop());
  await pushBusyboxImage(secured, 'base/busybox:1');
  const password = secured.credentials!.password;
  const withAuth = request({
    dockerfile: `FROM ${secured.host}/base/busybox:1\nRUN echo ok > /ok\n`,
    destination: `${secured.host}/drivers/auth:1`,
    dockerConfigJson: secured.dockerConfigJson(),
    imageRepoSecret: 'pull-secret',
  });
  const outcome = await settle(shared, withAuth);
  t.equal(outcome.state, 'Succeeded', `with credentials (${'reason' in outcome ? outcome.reason : ''})`);
  await shared.release(withAuth.key);

  const noPull = request({ dockerfile: `FROM ${secured.host}/base/busybox:1\nRUN true\n`, destination: `${secured.host}/drivers/auth:2` });
  const pullFailed = await settle(shared, noPull);
  t.equal(pullFailed.state, 'Failed', "this machine's own logins are not used");
  if (pullFailed.state === 'Failed') t.match(pullFailed.reason, /^build failed at step 1\/2 \(FROM /);
  await shared.release(noPull.key);

  // Built from the open registry, pushed to the secured one without credentials.
  const noPush = request({ dockerfile: `FROM ${BASE}\nRUN true\n`, destination: `${secured.host}/drivers/auth:3` });
  const pushFailed = await settle(shared, noPush);
  t.equal(pushFailed.state, 'Failed');
  if (pushFailed.state === 'Failed') {
    t.equal(pushFailed.code, 'PushFailed');
    t.match(pushFailed.reason, new RegExp(`^the built image could not be pushed to ${secured.host}/drivers/auth:3: .*authentication required`));
  }
  await shared.release(noPush.key);
  t.notOk(logLines.some((l) => l.includes(password)), 'no log line holds the password');
});

t.test('without buildah: Unavailable with what to install, never passed', async (t) => {
  const builder = createLocalBuilder({ buildah: '/nonexistent/buildah', logger });
  t.teardown(() => builder.close());
  const req = request({ dockerfile: `FROM ${BASE}\n`, destination: `${registry.host}/drivers/none:1` });
  const outcome = await builder.run(req);
  t.same(outcome, {
    state: 'Unavailable',
    code: 'BuilderUnavailable',
    reason: 'buildah is not installed on this machine (/nonexistent/buildah not found; Debian: apt-get install buildah); the build was not run',
  });
  t.same(await builder.run(req), outcome, 'every run says so');
});

t.test("a run's signal aborts only that call's waiting", async (t) => {
  const builder = newBuilder(t);
  const req = request({ dockerfile: `FROM ${BASE}\nRUN true\n`, destination: `${registry.host}/drivers/abort:1`, push: false });
  await t.rejects(builder.run(req, AbortSignal.abort()), { name: 'AbortError' });
  t.equal((await builder.run(req, new AbortController().signal)).state, 'Running');
  t.equal((await settle(builder, req)).state, 'Succeeded', 'the build went on');
});

t.test('close stops running builds and removes the storage it created', { timeout: TEST_TIMEOUT }, async (t) => {
  const builder = createLocalBuilder({ buildah: buildah.path, logger });
  const req = request({ dockerfile: `FROM ${BASE}\nRUN sleep 30\n`, destination: `${registry.host}/drivers/closed:1` });
  const buildsBefore = (await buildah.callsOf('build')).length;
  t.equal((await builder.run(req)).state, 'Running');
  const [call] = await newCalls('build', buildsBefore);
  const root = flagValue(call!, '--root')!;
  t.ok(root.startsWith(tmpdir()), 'storage under the temp directory by default');
  await new Promise((r) => setTimeout(r, 500));
  await builder.close();
  t.ok(await waitGroupGone(call!.pid), 'the build was stopped');
  t.notOk(await exists(join(root, '..')), 'its storage directory is removed');
  t.same(await builder.run(req), { state: 'Error', code: 'BuilderClosed', reason: 'the local builder is shut down; the build was not run' });
});
