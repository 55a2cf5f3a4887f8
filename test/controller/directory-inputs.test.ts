/**
 * The stand-alone mode's inputs (src/controller/directory-inputs.ts) on real directories: the
 * first read, the events for files added, changed and deleted, dependency events naming exactly
 * the Modules that use a Secret or ConfigMap, a broken file keeping its previous state, the poll
 * when fs.watch is off, a ConfigMap-volume layout, and stop() releasing the watchers and timers.
 */
import { mkdir, mkdtemp, rename, rm, symlink, unlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Writable } from 'node:stream';
import { pino } from 'pino';
import t, { type Test } from 'tap';
import { InputError } from '../../src/check/manifests.ts';
import { createDirectoryInputs, type DirectoryInputsOptions } from '../../src/controller/directory-inputs.ts';
import type { ClusterInputs, DependencyChange, ModuleChange } from '../../src/controller/inputs.ts';
import { moduleKey } from '../../src/engine/module.ts';

t.setTimeout(120_000);

const WAIT_MS = 5000;

type Event = ({ event: 'module' } & ModuleChange) | ({ event: 'dependency' } & DependencyChange);

/** Records events in order; `next()` takes the next one, waiting at most WAIT_MS. */
function recorder(inputs: ClusterInputs) {
  const queue: Event[] = [];
  let wake: (() => void) | undefined;
  const push = (e: Event) => {
    queue.push(e);
    wake?.();
  };
  inputs.on('module', (c) => push({ event: 'module', ...c }));
  inputs.on('dependency', (c) => push({ event: 'dependency', ...c }));
  const next = async (ms = WAIT_MS): Promise<Event> => {
    const deadline = Date.now() + ms;
    while (queue.length === 0) {
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`no event within ${ms} ms`);
      await new Promise<void>((r) => {
        const timer = setTimeout(r, left);
        wake = () => {
          clearTimeout(timer);
          r();
        };
      });
      wake = undefined;
    }
    return queue.shift()!;
  };
  /** Events that arrive within `ms` (for "nothing happened" checks). */
  const quiet = async (ms: number): Promise<Event[]> => {
    await new Promise((r) => setTimeout(r, ms));
    return queue.splice(0);
  };
  return { next, quiet };
}

const describeEvent = (e: Event) => (e.event === 'module' ? `module ${e.type} ${moduleKey(e.module)}` : `dependency ${e.kind} ${e.namespace}/${e.name} [${e.modules.join(',')}]`);

function logCapture() {
  const lines: string[] = [];
  const stream = new Writable({
    write(chunk: Buffer, _enc, cb) {
      lines.push(...chunk.toString().split('\n').filter((l) => l !== ''));
      cb();
    },
  });
  return { logger: pino({ level: 'debug' }, stream), lines };
}

const moduleYaml = (name: string, o: { namespace?: string; image?: string; pullSecret?: string; keySecret?: string; dockerfile?: string; extra?: string } = {}) => `apiVersion: kmm.sigs.x-k8s.io/v1beta1
kind: Module
metadata:
  name: ${name}
${o.namespace ? `  namespace: ${o.namespace}\n` : ''}spec:
${o.pullSecret ? `  imageRepoSecret:\n    name: ${o.pullSecret}\n` : ''}  selector:
    kubernetes.io/os: linux
  moduleLoader:
    container:
      modprobe:
        moduleName: ${name}
      kernelMappings:
        - regexp: '^.+$'
          containerImage: ${o.image ?? `registry.example/${name}:\${KERNEL_FULL_VERSION}`}
${o.keySecret ? `          sign:\n            keySecret:\n              name: ${o.keySecret}\n            certSecret:\n              name: ${o.keySecret}-cert\n` : ''}${o.dockerfile ? `          build:\n            dockerfileConfigMap:\n              name: ${o.dockerfile}\n` : ''}${o.extra ?? ''}`;

const pullSecretYaml = (name: string, auth: string, namespace?: string) => `apiVersion: v1
kind: Secret
metadata:
  name: ${name}
${namespace ? `  namespace: ${namespace}\n` : ''}type: kubernetes.io/dockerconfigjson
data:
  .dockerconfigjson: ${Buffer.from(JSON.stringify({ auths: { 'registry.example': { auth } } })).toString('base64')}
`;

const configMapYaml = (name: string, dockerfile: string) => `apiVersion: v1
kind: ConfigMap
metadata:
  name: ${name}
data:
  dockerfile: |
    ${dockerfile}
`;

let counter = 0;
/** Writes through a hidden temporary file and a rename, as a careful editor would. */
async function put(file: string, text: string) {
  const tmp = join(file, '..', `.tmp-${process.pid}-${++counter}`);
  await writeFile(tmp, text);
  await rename(tmp, file);
}

async function setup(t: Test, files: Record<string, string>, options: DirectoryInputsOptions = {}) {
  const dir = await mkdtemp(join(tmpdir(), 'kmm-preflight-dir-inputs-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  for (const [name, text] of Object.entries(files)) {
    await mkdir(join(dir, name, '..'), { recursive: true });
    await writeFile(join(dir, name), text);
  }
  const { logger, lines } = logCapture();
  const invalid: { key: string; errors: readonly string[] }[] = [];
  const inputs = createDirectoryInputs([dir], logger, { debounceMs: 50, pollIntervalMs: 0, onInvalid: (key, errors) => invalid.push({ key, errors }), ...options });
  t.teardown(() => inputs.stop());
  const events = recorder(inputs);
  await bounded(inputs.synced, 'synced');
  return { dir, inputs, events, lines, invalid };
}

function bounded<T>(p: Promise<T>, what: string, ms = WAIT_MS): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  return Promise.race([p.finally(() => clearTimeout(timer)), new Promise<never>((_, reject) => (timer = setTimeout(() => reject(new Error(`${what}: not within ${ms} ms`)), ms)))]);
}


t.test('first read: every Module added before synced, pull secrets, Secret and ConfigMap data', async (t) => {
  const { inputs, events } = await setup(t, {
    'a.yaml': moduleYaml('a', { pullSecret: 'pull', keySecret: 'key', dockerfile: 'df' }),
    'sub/b.yml': moduleYaml('b', { namespace: 'drivers' }),
    'secrets.yaml': `${pullSecretYaml('pull', 'dTpw')}---\napiVersion: v1\nkind: Secret\nmetadata:\n  name: key\nstringData:\n  key.pem: PRIVATE\n`,
    'cm.json': JSON.stringify({ apiVersion: 'v1', kind: 'ConfigMap', metadata: { name: 'df' }, data: { dockerfile: 'FROM scratch' } }),
    'notes.txt': 'not a manifest',
  });
  const first = [await events.next(), await events.next()];
  t.same(first.map(describeEvent), ['module added default/a', 'module added drivers/b'], 'one added event per Module, sorted');
  t.same(inputs.modules().map(moduleKey), ['default/a', 'drivers/b']);
  t.same(JSON.parse(inputs.pullSecret('default', 'pull')!), { auths: { 'registry.example': { auth: 'dTpw' } } });
  t.equal(inputs.secretData('default', 'key')?.['key.pem']?.toString(), 'PRIVATE', 'stringData of a plain Secret');
  t.equal(inputs.pullSecret('default', 'key'), undefined, 'no .dockerconfigjson key: no pull secret');
  t.same(inputs.configMapData('default', 'df'), { dockerfile: 'FROM scratch' });
  t.equal(inputs.secretData('default', 'missing'), undefined);
  t.same(await events.quiet(300), [], 'nothing more');
});

t.test('files added, changed, rewritten unchanged and deleted give the right Module events', async (t) => {
  const { dir, inputs, events } = await setup(t, { 'a.yaml': moduleYaml('a') });
  t.equal(describeEvent(await events.next()), 'module added default/a');

  await put(join(dir, 'b.yaml'), moduleYaml('b'));
  t.equal(describeEvent(await events.next()), 'module added default/b');

  await put(join(dir, 'a.yaml'), moduleYaml('a', { image: 'registry.example/a:v2' }));
  const modified = await events.next();
  t.equal(describeEvent(modified), 'module modified default/a');
  t.equal(modified.event === 'module' && modified.module.spec.moduleLoader?.container.kernelMappings[0]?.containerImage, 'registry.example/a:v2');
  t.equal(inputs.modules().find((m) => m.metadata.name === 'a')?.spec.moduleLoader?.container.kernelMappings[0]?.containerImage, 'registry.example/a:v2', 'state updated');

  // The same Module written differently (a comment, keys in another order): no event.
  await put(join(dir, 'a.yaml'), `# a comment\n${moduleYaml('a', { image: 'registry.example/a:v2' }).replace('kind: Module\n', '').replace('apiVersion:', 'kind: Module\napiVersion:')}`);
  t.same((await events.quiet(400)).map(describeEvent), [], 'a rewrite with the same content is no change');

  await unlink(join(dir, 'b.yaml'));
  const deleted = await events.next();
  t.equal(describeEvent(deleted), 'module deleted default/b');
  t.same(inputs.modules().map(moduleKey), ['default/a']);

  // A second document added to a file, then the file moved into a new subdirectory.
  await put(join(dir, 'a.yaml'), `${moduleYaml('a', { image: 'registry.example/a:v2' })}---\n${moduleYaml('c')}`);
  t.equal(describeEvent(await events.next()), 'module added default/c');
  await mkdir(join(dir, 'nested'));
  await rename(join(dir, 'a.yaml'), join(dir, 'nested', 'a.yaml'));
  t.same((await events.quiet(500)).map(describeEvent), [], 'a file moved into a new subdirectory: same Modules, no event');
  await put(join(dir, 'nested', 'a.yaml'), moduleYaml('a', { image: 'registry.example/a:v2' }));
  t.equal(describeEvent(await events.next()), 'module deleted default/c', 'the new subdirectory is watched');
});

t.test('a Secret or ConfigMap change names exactly the Modules that reference it', async (t) => {
  const { dir, events } = await setup(t, {
    'modules.yaml': [
      moduleYaml('uses-pull', { pullSecret: 'pull' }),
      moduleYaml('signs', { keySecret: 'pull' }),
      moduleYaml('builds', { dockerfile: 'df' }),
      moduleYaml('other-ns', { namespace: 'elsewhere', pullSecret: 'pull' }),
      moduleYaml('plain'),
    ].join('---\n'),
    'pull.yaml': pullSecretYaml('pull', 'djE='),
    'unused.yaml': pullSecretYaml('unused', 'djE='),
    'df.yaml': configMapYaml('df', 'FROM a'),
  });
  for (let i = 0; i < 5; i++) await events.next();

  await put(join(dir, 'unused.yaml'), pullSecretYaml('unused', 'djI='));
  await put(join(dir, 'pull.yaml'), pullSecretYaml('pull', 'djI='));
  const dep = await events.next();
  t.same(dep, { event: 'dependency', kind: 'Secret', namespace: 'default', name: 'pull', modules: ['default/signs', 'default/uses-pull'] }, 'the Modules using default/pull, not the one in another namespace; nothing for the unreferenced Secret');

  await put(join(dir, 'df.yaml'), configMapYaml('df', 'FROM b'));
  t.same(await events.next(), { event: 'dependency', kind: 'ConfigMap', namespace: 'default', name: 'df', modules: ['default/builds'] });

  // Deleting a referenced Secret is a change; creating one a Module waits for, too.
  await unlink(join(dir, 'pull.yaml'));
  t.same(await events.next(), { event: 'dependency', kind: 'Secret', namespace: 'default', name: 'pull', modules: ['default/signs', 'default/uses-pull'] });
  await put(join(dir, 'cert.yaml'), `apiVersion: v1\nkind: Secret\nmetadata:\n  name: pull-cert\ndata:\n  cert.pem: ${Buffer.from('CERT').toString('base64')}\n`);
  t.same(await events.next(), { event: 'dependency', kind: 'Secret', namespace: 'default', name: 'pull-cert', modules: ['default/signs'] });
  t.same((await events.quiet(300)).map(describeEvent), []);
});

t.test('a broken file keeps its previous state and is logged once; the other files still count', async (t) => {
  const { dir, inputs, events, lines, invalid } = await setup(t, {
    'a.yaml': `${moduleYaml('a')}---\n${moduleYaml('a2')}`,
    'b.yaml': moduleYaml('b'),
  });
  for (let i = 0; i < 3; i++) await events.next();

  await put(join(dir, 'a.yaml'), `${moduleYaml('a')}---\nkind: [unclosed\n`);
  await put(join(dir, 'b.yaml'), moduleYaml('b', { image: 'registry.example/b:v2' }));
  t.equal(describeEvent(await events.next()), 'module modified default/b', 'a good file changed next to a broken one still counts');
  t.same((await events.quiet(300)).map(describeEvent), [], 'nothing deleted because of the broken file');
  t.same(inputs.modules().map(moduleKey), ['default/a', 'default/a2', 'default/b'], 'the broken file keeps its Modules');
  const errors = lines.filter((l) => l.includes('manifest error') && l.includes('a.yaml'));
  t.equal(errors.length, 1, 'logged once');
  t.match(errors[0], /document 2: .*at line \d+, column \d+/, 'with the place of the error');
  t.notMatch(errors[0], /unclosed/, 'but not the text of the file (it could be a Secret)');

  // An invalid Module (no selector, no modprobe): the same, and reported through onInvalid.
  await put(join(dir, 'a.yaml'), `${moduleYaml('a')}---\napiVersion: kmm.sigs.x-k8s.io/v1beta1\nkind: Module\nmetadata:\n  name: a2\nspec:\n  moduleLoader:\n    container: {}\n`);
  t.same((await events.quiet(400)).map(describeEvent), []);
  t.same(inputs.modules().map(moduleKey), ['default/a', 'default/a2', 'default/b']);
  t.equal(invalid.length, 1);
  t.equal(invalid[0]?.key, 'default/a2');
  t.match(invalid[0]?.errors.join('\n'), /spec\.selector: required/);

  // Fixed: the file's new content applies.
  await put(join(dir, 'a.yaml'), moduleYaml('a'));
  t.equal(describeEvent(await events.next()), 'module deleted default/a2');
  t.ok(lines.some((l) => l.includes('manifest readable again') && l.includes('a.yaml')), 'the recovery is logged');
});

t.test('the poll alone sees changes when fs.watch is off', async (t) => {
  const { dir, events } = await setup(t, { 'a.yaml': moduleYaml('a') }, { watch: false, pollIntervalMs: 200 });
  await events.next();
  await put(join(dir, 'b.yaml'), moduleYaml('b'));
  t.equal(describeEvent(await events.next()), 'module added default/b');
});

t.test('a ConfigMap volume (..data symlinks) is read once and its atomic swap is seen', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'kmm-preflight-cm-volume-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  const version = async (n: number, files: Record<string, string>) => {
    const d = join(dir, `..2024_01_01_00_00_0${n}.000000000`);
    await mkdir(d);
    for (const [name, text] of Object.entries(files)) await writeFile(join(d, name), text);
    await symlink(`..2024_01_01_00_00_0${n}.000000000`, join(dir, '..data_tmp'));
    await rename(join(dir, '..data_tmp'), join(dir, '..data'));
  };
  await version(1, { 'modules.yaml': moduleYaml('a') });
  await symlink('..data/modules.yaml', join(dir, 'modules.yaml'));
  const { logger, lines } = logCapture();
  const inputs = createDirectoryInputs([dir], logger, { debounceMs: 50, pollIntervalMs: 0 });
  t.teardown(() => inputs.stop());
  const events = recorder(inputs);
  await bounded(inputs.synced, 'synced');
  t.equal(describeEvent(await events.next()), 'module added default/a');
  t.notOk(lines.some((l) => l.includes('also defined')), 'the timestamped directory is not read a second time');
  await version(2, { 'modules.yaml': moduleYaml('a', { image: 'registry.example/a:v3' }) });
  t.equal(describeEvent(await events.next()), 'module modified default/a');
});

t.test('a path that does not exist is refused at once', async (t) => {
  t.throws(() => createDirectoryInputs([join(tmpdir(), 'kmm-preflight-no-such-dir', 'x')], pino({ level: 'silent' })), InputError);
});

t.test('stop() closes the watchers and timers; no event after it', async (t) => {
  const before = process.getActiveResourcesInfo();
  const count = (list: string[], type: string) => list.filter((r) => r === type).length;
  const dir = await mkdtemp(join(tmpdir(), 'kmm-preflight-dir-stop-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  await mkdir(join(dir, 'sub'));
  await writeFile(join(dir, 'a.yaml'), moduleYaml('a'));
  const inputs = createDirectoryInputs([dir], pino({ level: 'silent' }), { debounceMs: 50, pollIntervalMs: 1000 });
  const events = recorder(inputs);
  await bounded(inputs.synced, 'synced');
  await events.next();
  const during = process.getActiveResourcesInfo();
  t.ok(count(during, 'FSEventWrap') >= count(before, 'FSEventWrap') + 2, 'a watcher on the directory and on its subdirectory');
  t.ok(count(during, 'Timeout') > count(before, 'Timeout'), 'the poll timer');
  await inputs.stop();
  await new Promise((r) => setTimeout(r, 50)); // a closed watcher's handle goes a little later
  const after = process.getActiveResourcesInfo();
  t.equal(count(after, 'FSEventWrap'), count(before, 'FSEventWrap'), 'every watcher closed');
  t.equal(count(after, 'Timeout'), count(before, 'Timeout'), 'every timer cleared');
  await put(join(dir, 'b.yaml'), moduleYaml('b'));
  t.same(await events.quiet(400), [], 'no event after stop()');
});
