/**
 * The gate's in-memory inputs: the PreflightValidationOCP objects mirrored from this server's
 * storage (list, then watch), the Modules once read, and release tags resolved to digests in the
 * background; and the gate failing closed, saying why, until it has read them.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pino } from 'pino';
import t from 'tap';
import { createGateState, type ModuleSource } from '../../src/gate/gate-state.ts';
import { reviewClusterVersionUpdate } from '../../src/gate/upgrade-gate.ts';
import type { RegistryClient, ResolvedImage } from '../../src/registry/types.ts';
import type { RequestContext } from '../../src/server/registry.ts';
import { createRegistries } from '../../src/server/server.ts';
import { openSqliteStore } from '../../src/storage/sqlite-store.ts';

const logger = pino({ level: 'silent' });
const ctx: RequestContext = { user: { username: 'test', groups: ['system:masters'] }, dryRun: false, fieldManager: 'test', fieldValidation: 'Strict', warnings: [] };
const DIGEST = `sha256:${'a'.repeat(64)}`;

async function until<T>(what: string, probe: () => T | undefined): Promise<T> {
  const deadline = Date.now() + 10_000;
  for (;;) {
    const v = probe();
    if (v !== undefined) return v;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

t.test('mirror, Modules, digests; fail closed until read', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'kmm-preflight-gate-state-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  const store = await openSqliteStore({ path: join(dir, 'db.sqlite'), compactIntervalMs: 0 });
  t.teardown(() => store.close());
  const [, pfvo] = createRegistries(store, logger);
  await pfvo!.create({ apiVersion: 'kmm.sigs.x-k8s.io/v1beta2', kind: 'PreflightValidationOCP', metadata: { name: 'before' }, spec: { releaseImage: 'registry.example/ocp/release:4.16.1' } }, ctx);

  const resolved: string[] = [];
  const registry = {
    bytesReceived: 0,
    async resolveImage(ref) {
      resolved.push(`${ref.domain}/${ref.path}:${ref.tag}`);
      return { reference: ref, digest: `sha256:${'b'.repeat(64)}`, indexDigest: DIGEST, mediaType: 'x', config: { mediaType: 'x', digest: 'x', size: 0 }, layers: [] } as ResolvedImage;
    },
    async openBlob() {
      throw new Error('not used');
    },
  } as RegistryClient;
  let release!: () => void;
  const listeners: (() => void)[] = [];
  let moduleList = [{ metadata: { name: 'a', namespace: 'drivers' } }];
  const modules: ModuleSource = { modules: () => moduleList, synced: new Promise<void>((r) => (release = r)), onChange: (l) => void listeners.push(l) };
  const gate = createGateState({ pfvo: pfvo!, modules, registry, accessFor: () => ({}), platform: { os: 'linux', architecture: 'amd64' }, logger });
  t.teardown(() => gate.stop());

  // Before start: nothing read; an upgrade is refused, saying why.
  t.throws(() => gate.validations(), /have not been read yet/);
  const body = {
    apiVersion: 'admission.k8s.io/v1',
    kind: 'AdmissionReview',
    request: {
      uid: 'u',
      kind: { group: 'config.openshift.io', version: 'v1', kind: 'ClusterVersion' },
      resource: { group: 'config.openshift.io', version: 'v1', resource: 'clusterversions' },
      name: 'version',
      operation: 'UPDATE',
      userInfo: { username: 'admin' },
      object: { apiVersion: 'config.openshift.io/v1', kind: 'ClusterVersion', metadata: { name: 'version' }, spec: { desiredUpdate: { image: `registry.example/ocp/release@${DIGEST}` } } },
      oldObject: { apiVersion: 'config.openshift.io/v1', kind: 'ClusterVersion', metadata: { name: 'version' }, spec: {} },
    },
  };
  const early = reviewClusterVersionUpdate(body, gate, { mode: 'enforce', honourForce: false });
  t.match(early.body, { response: { uid: 'u', allowed: false, status: { code: 500, message: /have not been read yet/ } } }, 'fails closed with the reason');

  const started = gate.start();
  const listed = () => {
    try {
      return gate.validations().length > 0 ? true : undefined;
    } catch {
      return undefined;
    }
  };
  await until('the first list', listed);
  t.notOk(gate.ready, 'not ready while the Modules are not read');
  t.throws(() => gate.modules(), /Modules have not been read yet/);
  release();
  await started;
  t.ok(gate.ready);
  t.same(gate.validations().map((v) => v.metadata.name), ['before']);
  t.equal(gate.modules(), gate.modules(), 'the same array while the Modules do not change');
  const first = gate.modules();
  moduleList = [...moduleList, { metadata: { name: 'b', namespace: 'drivers' } }];
  t.equal(gate.modules(), first, 'cached until told');
  for (const l of listeners) l();
  t.equal(gate.modules().length, 2, 'a change is seen');

  // The tag of the object listed first was resolved in the background, once.
  const digest = await until('the tag resolved', () => gate.digestOf('registry.example/ocp/release:4.16.1'));
  t.equal(digest, DIGEST, 'a release is named by its index digest');
  t.same(resolved, ['registry.example/ocp/release:4.16.1']);

  // Followed through the watch: an object created, then deleted.
  await pfvo!.create({ apiVersion: 'kmm.sigs.x-k8s.io/v1beta2', kind: 'PreflightValidationOCP', metadata: { name: 'after' }, spec: { releaseImage: `registry.example/ocp/release@${DIGEST}` } }, ctx);
  await until('the new object', () => (gate.validations().some((v) => v.metadata.name === 'after') ? true : undefined));
  await pfvo!.delete('before', {}, ctx);
  await until('the deletion', () => (gate.validations().every((v) => v.metadata.name !== 'before') ? true : undefined));
  t.same(resolved.length, 1, 'a digest reference needs no lookup');
});
