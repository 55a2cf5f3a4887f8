import t, { type Test } from 'tap';
import {
  ApplyBadRequestError,
  ApplyConflictError,
  FieldManagerError,
  KUBE_CRD_RESET_FIELDS,
  conflictCauses,
  conflictStatus,
  createFieldManager,
  formatConflictMessage,
  type FieldManager,
  type JsonObject,
  type ManagedFieldsEntry,
} from '../../src/apply/field-manager.ts';
import { preflightValidationSchema } from './fixtures/preflight-schema.ts';

const API = 'kmm.sigs.x-k8s.io/v1beta2';
const KIND = 'PreflightValidation';
const T0 = Date.UTC(2024, 0, 1, 0, 0, 0);

/** A field manager whose clock advances one second per call. */
function newManager(extra: { maxUpdateManagers?: number; onUpdateError?: (e: Error) => void } = {}): FieldManager {
  let tick = 0;
  return createFieldManager({
    schema: preflightValidationSchema,
    apiVersion: API,
    resetFields: KUBE_CRD_RESET_FIELDS,
    now: () => new Date(T0 + 1000 * tick++),
    ...extra,
  });
}

const at = (seconds: number) => new Date(T0 + 1000 * seconds).toISOString().replace('.000Z', 'Z');

function pv(spec: JsonObject | undefined, metadata: JsonObject = {}, status?: JsonObject): JsonObject {
  const o: JsonObject = { apiVersion: API, kind: KIND, metadata: { name: 'pv', ...metadata } };
  if (spec) o['spec'] = spec;
  if (status) o['status'] = status;
  return o;
}

function entries(obj: JsonObject): ManagedFieldsEntry[] {
  return ((obj['metadata'] as JsonObject)['managedFields'] as ManagedFieldsEntry[] | undefined) ?? [];
}

function entry(obj: JsonObject, manager: string, operation?: 'Apply' | 'Update'): ManagedFieldsEntry | undefined {
  return entries(obj).find((e) => e.manager === manager && (operation === undefined || e.operation === operation));
}

function fields(obj: JsonObject, manager: string, operation?: 'Apply' | 'Update'): JsonObject | undefined {
  return entry(obj, manager, operation)?.fieldsV1;
}

/** Same content and same key order (kube's serialisation order). */
function sameJSON(tt: Test, actual: unknown, expected: unknown, message?: string) {
  tt.equal(JSON.stringify(actual, null, 1), JSON.stringify(expected, null, 1), message ?? 'same JSON, same key order');
}

function module(namespace: string, name: string, extra: JsonObject = {}): JsonObject {
  return { namespace, name, verificationStatus: 'True', verificationStage: 'Done', ...extra };
}

function modulesOf(obj: JsonObject): JsonObject[] {
  return ((obj['status'] as JsonObject)['modules'] as JsonObject[]) ?? [];
}

t.test('create via update: every set field is owned by the manager in one Update entry', async (t) => {
  const fm = newManager();
  const created = fm.update({
    previous: undefined,
    next: pv({ kernelVersion: '6.1.0-18-amd64', pushBuiltImage: true }, { labels: { app: 'kmm' }, finalizers: ['kmm/preflight'] }),
    manager: 'kubectl-create',
    subresource: '',
  });
  t.same(entries(created), [
    {
      manager: 'kubectl-create',
      operation: 'Update',
      apiVersion: API,
      time: at(0),
      fieldsType: 'FieldsV1',
      fieldsV1: {
        'f:metadata': { 'f:finalizers': { '.': {}, 'v:"kmm/preflight"': {} }, 'f:labels': { '.': {}, 'f:app': {} } },
        'f:spec': { '.': {}, 'f:kernelVersion': {}, 'f:pushBuiltImage': {} },
      },
    },
  ]);
  t.strictSame(Object.keys(entries(created)[0] as object), ['manager', 'operation', 'apiVersion', 'time', 'fieldsType', 'fieldsV1']);
  t.equal((created['spec'] as JsonObject)['kernelVersion'], '6.1.0-18-amd64', 'the object itself is unchanged');
});

t.test('metadata identity, apiVersion and kind are never owned (stripMetaManager)', async (t) => {
  const fm = newManager();
  const created = fm.update({
    previous: undefined,
    next: pv({ kernelVersion: 'k' }, { uid: 'u1', resourceVersion: '5', generation: 1, creationTimestamp: '2024-01-01T00:00:00Z' }),
    manager: 'm',
    subresource: '',
  });
  sameJSON(t, fields(created, 'm'), { 'f:spec': { '.': {}, 'f:kernelVersion': {} } });
  const applied = fm.apply({ current: undefined, applied: pv({ kernelVersion: 'k' }), manager: 'a', force: false, subresource: '' });
  sameJSON(t, fields(applied, 'a'), { 'f:spec': { 'f:kernelVersion': {} } });
});

t.test('round trip: fieldsV1 of a known object is exactly kube\'s serialisation', async (t) => {
  const fm = newManager();
  const created = fm.update({
    previous: undefined,
    next: pv({ kernelVersion: '6.1.0-18-amd64' }, { labels: { 'app.kubernetes.io/name': 'kmm', a: 'b' } }),
    manager: 'kubectl-create',
    subresource: '',
  });
  const withStatus = fm.update({
    previous: created,
    next: {
      ...created,
      status: {
        kernelVersion: '6.1.0-18-amd64',
        modules: [
          module('zeta', 'b', { statusReason: 'ok' }),
          module('alpha', 'a'),
          module('zeta', 'a'),
        ],
        conditions: [{ type: 'Verified', status: 'True', lastTransitionTime: at(0), reason: 'AllVerified', message: 'all good' }],
        counts: { total: 3, verified: 3, failed: 0, error: 0, pending: 0 },
        observedGeneration: 1,
      },
    },
    manager: 'kmm-operator',
    subresource: 'status',
  });
  const moduleFields = { '.': {}, 'f:name': {}, 'f:namespace': {}, 'f:verificationStage': {}, 'f:verificationStatus': {} };
  const expected = {
    'f:status': {
      '.': {},
      'f:conditions': {
        '.': {},
        'k:{"type":"Verified"}': { '.': {}, 'f:lastTransitionTime': {}, 'f:message': {}, 'f:reason': {}, 'f:status': {}, 'f:type': {} },
      },
      'f:counts': { '.': {}, 'f:error': {}, 'f:failed': {}, 'f:pending': {}, 'f:total': {}, 'f:verified': {} },
      'f:kernelVersion': {},
      'f:modules': {
        '.': {},
        // Keys sorted by field name (name < namespace), items by key values.
        'k:{"name":"a","namespace":"alpha"}': moduleFields,
        'k:{"name":"a","namespace":"zeta"}': moduleFields,
        'k:{"name":"b","namespace":"zeta"}': { '.': {}, 'f:name': {}, 'f:namespace': {}, 'f:statusReason': {}, 'f:verificationStage': {}, 'f:verificationStatus': {} },
      },
      'f:observedGeneration': {},
    },
  };
  sameJSON(t, fields(withStatus, 'kmm-operator'), expected);
  t.equal(entry(withStatus, 'kmm-operator')?.subresource, 'status');
  sameJSON(t, fields(withStatus, 'kubectl-create'), {
    'f:metadata': { 'f:labels': { '.': {}, 'f:a': {}, 'f:app.kubernetes.io/name': {} } },
    'f:spec': { '.': {}, 'f:kernelVersion': {} },
  });
  t.same(
    entries(withStatus).map((e) => e.manager),
    ['kubectl-create', 'kmm-operator'],
    'entries sorted by operation, then time',
  );

  // Decoding and re-encoding (a no-op write) gives back the same JSON.
  const again = fm.update({ previous: withStatus, next: structuredClone(withStatus), manager: 'kubectl-edit', subresource: '' });
  sameJSON(t, entries(again), entries(withStatus));
});

t.test('apply creates ownership with operation Apply (no "." for structs and map keys)', async (t) => {
  const fm = newManager();
  const created = fm.apply({
    current: undefined,
    applied: pv({ kernelVersion: '6.1.0-18-amd64', pushBuiltImage: true }, { labels: { app: 'kmm' }, finalizers: ['f1'] }),
    manager: 'kubectl',
    force: false,
    subresource: '',
  });
  t.same(entries(created), [
    {
      manager: 'kubectl',
      operation: 'Apply',
      apiVersion: API,
      time: at(0),
      fieldsType: 'FieldsV1',
      fieldsV1: {
        'f:metadata': { 'f:finalizers': { 'v:"f1"': {} }, 'f:labels': { 'f:app': {} } },
        'f:spec': { 'f:kernelVersion': {}, 'f:pushBuiltImage': {} },
      },
    },
  ]);
  t.same(created['spec'], { kernelVersion: '6.1.0-18-amd64', pushBuiltImage: true });
});

t.test('re-applying the same configuration is a no-op: the current object is returned', async (t) => {
  const fm = newManager();
  const config = pv({ kernelVersion: 'k1', pushBuiltImage: true }, { labels: { app: 'kmm' } });
  const created = fm.apply({ current: undefined, applied: config, manager: 'kubectl', force: false, subresource: '' });
  const again = fm.apply({ current: created, applied: structuredClone(config), manager: 'kubectl', force: false, subresource: '' });
  t.equal(again, created, 'same instance: nothing to write');
  const changed = fm.apply({ current: created, applied: pv({ kernelVersion: 'k2', pushBuiltImage: true }, { labels: { app: 'kmm' } }), manager: 'kubectl', force: false, subresource: '' });
  t.not(changed, created);
  t.equal(entry(created, 'kubectl')?.time, at(0));
  t.equal(entry(changed, 'kubectl')?.time, at(1), 'time updated when the object changes (the no-op did not read the clock)');
  t.equal((changed['spec'] as JsonObject)['kernelVersion'], 'k2');
});

t.test('two appliers on distinct fields own their fields; omitting a field removes it unless someone else owns it', async (t) => {
  const fm = newManager();
  let obj = fm.apply({ current: undefined, applied: pv({ kernelVersion: 'k1' }), manager: 'a', force: false, subresource: '' });
  obj = fm.apply({ current: obj, applied: pv({ pushBuiltImage: true }), manager: 'b', force: false, subresource: '' });
  t.same(obj['spec'], { kernelVersion: 'k1', pushBuiltImage: true });
  sameJSON(t, fields(obj, 'a'), { 'f:spec': { 'f:kernelVersion': {} } });
  sameJSON(t, fields(obj, 'b'), { 'f:spec': { 'f:pushBuiltImage': {} } });

  // b stops setting pushBuiltImage: it is removed from the object, and b's entry (now empty) goes.
  const bDrops = fm.apply({ current: obj, applied: pv(undefined), manager: 'b', force: false, subresource: '' });
  t.same(bDrops['spec'], { kernelVersion: 'k1' });
  t.equal(entry(bDrops, 'b'), undefined);
  t.ok(entry(bDrops, 'a'));

  // Both apply the same value of pushBuiltImage: shared ownership, no conflict.
  let shared = fm.apply({ current: obj, applied: pv({ kernelVersion: 'k1', pushBuiltImage: true }), manager: 'a', force: false, subresource: '' });
  sameJSON(t, fields(shared, 'a'), { 'f:spec': { 'f:kernelVersion': {}, 'f:pushBuiltImage': {} } });
  sameJSON(t, fields(shared, 'b'), { 'f:spec': { 'f:pushBuiltImage': {} } });
  // b omits it now: a still owns it, so it stays.
  shared = fm.apply({ current: shared, applied: pv(undefined), manager: 'b', force: false, subresource: '' });
  t.same(shared['spec'], { kernelVersion: 'k1', pushBuiltImage: true });
  t.equal(entry(shared, 'b'), undefined);
});

t.test('omitting every field of a struct removes the struct when nobody owns anything in it', async (t) => {
  const fm = newManager();
  let obj = fm.apply({ current: undefined, applied: pv({ kernelVersion: 'k1' }, { labels: { a: '1' } }), manager: 'a', force: false, subresource: '' });
  obj = fm.apply({ current: obj, applied: pv(undefined), manager: 'a', force: false, subresource: '' });
  t.notOk('spec' in obj, 'spec removed');
  t.same(obj['metadata'], { name: 'pv' }, 'labels removed, metadata and its name kept');
  t.same(entries(obj), [], 'nothing owned any more');
});

t.test('conflict between appliers; force moves the field to the forcing manager', async (t) => {
  const fm = newManager();
  let obj = fm.apply({ current: undefined, applied: pv({ kernelVersion: 'k1', pushBuiltImage: true }), manager: 'a', force: false, subresource: '' });
  const b = pv({ kernelVersion: 'k1', pushBuiltImage: false });
  const err = t.throws(() => fm.apply({ current: obj, applied: b, manager: 'b', force: false, subresource: '' })) as unknown;
  t.ok(err instanceof ApplyConflictError);
  const conflicts = (err as ApplyConflictError).conflicts;
  t.same(conflicts, [{ manager: 'a', field: '.spec.pushBuiltImage', operation: 'Apply' }]);
  t.equal((err as Error).message, 'Apply failed with 1 conflict: conflict with "a": .spec.pushBuiltImage');

  obj = fm.apply({ current: obj, applied: b, manager: 'b', force: true, subresource: '' });
  t.equal((obj['spec'] as JsonObject)['pushBuiltImage'], false);
  sameJSON(t, fields(obj, 'b'), { 'f:spec': { 'f:kernelVersion': {}, 'f:pushBuiltImage': {} } });
  sameJSON(t, fields(obj, 'a'), { 'f:spec': { 'f:kernelVersion': {} } }, 'a lost pushBuiltImage, still shares kernelVersion');
});

t.test('conflicts with Update managers print "using <apiVersion>" (kubectl-client-side-apply, kubectl-edit)', async (t) => {
  const fm = newManager();
  let obj = fm.update({ previous: undefined, next: pv({ kernelVersion: 'k1', pushBuiltImage: true }), manager: 'kubectl-client-side-apply', subresource: '' });
  obj = fm.update({ previous: obj, next: { ...obj, spec: { kernelVersion: 'k2', pushBuiltImage: true } }, manager: 'kubectl-edit', subresource: '' });
  const err = t.throws(() =>
    fm.apply({ current: obj, applied: pv({ kernelVersion: 'k3', pushBuiltImage: false }), manager: 'kubectl', force: false, subresource: '' }),
  ) as ApplyConflictError;
  t.ok(err instanceof ApplyConflictError);
  t.equal(
    err.message,
    'Apply failed with 2 conflicts: conflicts with "kubectl-client-side-apply" using kmm.sigs.x-k8s.io/v1beta2:\n' +
      '- .spec.pushBuiltImage\n' +
      'conflicts with "kubectl-edit" using kmm.sigs.x-k8s.io/v1beta2:\n' +
      '- .spec.kernelVersion',
  );
  t.same(conflictCauses(err.conflicts), [
    { reason: 'FieldManagerConflict', message: 'conflict with "kubectl-client-side-apply" using kmm.sigs.x-k8s.io/v1beta2', field: '.spec.pushBuiltImage' },
    { reason: 'FieldManagerConflict', message: 'conflict with "kubectl-edit" using kmm.sigs.x-k8s.io/v1beta2', field: '.spec.kernelVersion' },
  ]);
  const status = conflictStatus(err.conflicts);
  t.equal(status['code'], 409);
  t.equal(status['reason'], 'Conflict');
  t.equal(
    formatConflictMessage([{ manager: 'kubectl-client-side-apply', operation: 'Update', apiVersion: API, field: '.spec.pushBuiltImage' }]),
    'Apply failed with 1 conflict: conflict with "kubectl-client-side-apply" using kmm.sigs.x-k8s.io/v1beta2: .spec.pushBuiltImage',
  );

  // Applying the values already there is not a conflict: the applier shares ownership.
  const same = fm.apply({ current: obj, applied: pv({ kernelVersion: 'k2', pushBuiltImage: true }), manager: 'kubectl', force: false, subresource: '' });
  sameJSON(t, fields(same, 'kubectl', 'Apply'), { 'f:spec': { 'f:kernelVersion': {}, 'f:pushBuiltImage': {} } });
  sameJSON(t, fields(same, 'kubectl-edit'), { 'f:spec': { 'f:kernelVersion': {} } });
  t.ok(entry(same, 'kubectl-client-side-apply'));
});

t.test('update after apply takes ownership of the fields it changes only', async (t) => {
  const fm = newManager();
  let obj = fm.apply({ current: undefined, applied: pv({ kernelVersion: 'k1', pushBuiltImage: true }, { labels: { a: '1' } }), manager: 'kubectl', force: false, subresource: '' });
  obj = fm.update({ previous: obj, next: { ...obj, spec: { kernelVersion: 'k2', pushBuiltImage: true } }, manager: 'kubectl-edit', subresource: '' });
  sameJSON(t, fields(obj, 'kubectl-edit'), { 'f:spec': { 'f:kernelVersion': {} } });
  sameJSON(t, fields(obj, 'kubectl'), { 'f:metadata': { 'f:labels': { 'f:a': {} } }, 'f:spec': { 'f:pushBuiltImage': {} } }, 'unchanged fields stay with the applier');
  t.same(
    entries(obj).map((e) => [e.manager, e.operation]),
    [
      ['kubectl', 'Apply'],
      ['kubectl-edit', 'Update'],
    ],
  );

  // A later update by the same manager keeps what it owned and adds what it changed.
  const t2 = fm.update({ previous: obj, next: { ...obj, spec: { kernelVersion: 'k2', pushBuiltImage: false } }, manager: 'kubectl-edit', subresource: '' });
  sameJSON(t, fields(t2, 'kubectl-edit'), { 'f:spec': { 'f:kernelVersion': {}, 'f:pushBuiltImage': {} } });
  sameJSON(t, fields(t2, 'kubectl'), { 'f:metadata': { 'f:labels': { 'f:a': {} } } });
  t.equal(entry(t2, 'kubectl-edit')?.time, at(2));

  // An update that changes nothing leaves managedFields (and times) alone.
  const noop = fm.update({ previous: t2, next: structuredClone(t2), manager: 'kubectl-edit', subresource: '' });
  t.same(entries(noop), entries(t2));
});

t.test('update removing a field removes it from every manager and drops emptied entries', async (t) => {
  const fm = newManager();
  let obj = fm.apply({ current: undefined, applied: pv({ kernelVersion: 'k1' }, { labels: { a: '1' } }), manager: 'a', force: false, subresource: '' });
  obj = fm.apply({ current: obj, applied: pv({ pushBuiltImage: true }), manager: 'b', force: false, subresource: '' });
  const next = structuredClone(obj);
  delete (next['spec'] as JsonObject)['pushBuiltImage'];
  obj = fm.update({ previous: obj, next, manager: 'kubectl-edit', subresource: '' });
  t.equal(entry(obj, 'b'), undefined, 'b owned nothing else');
  t.equal(entry(obj, 'kubectl-edit'), undefined, 'removing a field gives no ownership');
  t.ok(entry(obj, 'a'));
});

t.test('list-map status.modules (keys namespace+name): items merge by key; an item the applier drops is removed', async (t) => {
  const fm = newManager();
  let obj = fm.apply({ current: undefined, applied: pv({ kernelVersion: 'k1' }), manager: 'kubectl', force: false, subresource: '' });
  obj = fm.update({
    previous: obj,
    next: { ...obj, status: { modules: [module('ns1', 'm1'), module('ns1', 'm2')] } },
    manager: 'kmm-operator',
    subresource: 'status',
  });
  obj = fm.apply({
    current: obj,
    applied: { apiVersion: API, kind: KIND, metadata: { name: 'pv' }, status: { modules: [module('ns2', 'm3', { statusReason: 'applied' })] } },
    manager: 'checker',
    force: false,
    subresource: 'status',
  });
  t.same(modulesOf(obj).map((m) => `${m['namespace']}/${m['name']}`), ['ns1/m1', 'ns1/m2', 'ns2/m3']);
  sameJSON(t, fields(obj, 'checker'), {
    'f:status': {
      'f:modules': {
        'k:{"name":"m3","namespace":"ns2"}': {
          '.': {},
          'f:name': {},
          'f:namespace': {},
          'f:statusReason': {},
          'f:verificationStage': {},
          'f:verificationStatus': {},
        },
      },
    },
  });
  t.equal(entry(obj, 'checker')?.subresource, 'status');

  // The applier now applies another item: its previous item goes, the operator's stay.
  obj = fm.apply({
    current: obj,
    applied: { apiVersion: API, kind: KIND, metadata: { name: 'pv' }, status: { modules: [module('ns2', 'm4')] } },
    manager: 'checker',
    force: false,
    subresource: 'status',
  });
  t.same(modulesOf(obj).map((m) => `${m['namespace']}/${m['name']}`), ['ns1/m1', 'ns1/m2', 'ns2/m4']);

  // Applying a field of an operator's item merges into the item; changing one the operator set conflicts.
  obj = fm.apply({
    current: obj,
    applied: { apiVersion: API, kind: KIND, metadata: { name: 'pv' }, status: { modules: [module('ns2', 'm4'), { namespace: 'ns1', name: 'm1', statusReason: 'checked', verificationStatus: 'True', verificationStage: 'Done' }] } },
    manager: 'checker',
    force: false,
    subresource: 'status',
  });
  t.same(modulesOf(obj).find((m) => m['name'] === 'm1'), module('ns1', 'm1', { statusReason: 'checked' }));
  // Shared items follow the applied order (m4 before m1), others keep their place: structured-merge-diff's merge.
  t.same(modulesOf(obj).map((m) => m['name']), ['m2', 'm4', 'm1']);
  const err = t.throws(() =>
    fm.apply({
      current: obj,
      applied: { apiVersion: API, kind: KIND, metadata: { name: 'pv' }, status: { modules: [module('ns1', 'm2', { verificationStatus: 'False' })] } },
      manager: 'checker',
      force: false,
      subresource: 'status',
    }),
  ) as ApplyConflictError;
  t.equal(
    err.message,
    'Apply failed with 1 conflict: conflict with "kmm-operator" with subresource "status" using kmm.sigs.x-k8s.io/v1beta2: .status.modules[name="m2",namespace="ns1"].verificationStatus',
  );
});

t.test('list-map status.conditions (key type): appliers of different types coexist', async (t) => {
  const fm = newManager();
  const cond = (type: string, status: string) => ({ type, status, lastTransitionTime: at(0), reason: 'R', message: 'm' });
  const statusApply = (manager: string, conditions: JsonObject[], current: JsonObject) =>
    fm.apply({ current, applied: { apiVersion: API, kind: KIND, metadata: { name: 'pv' }, status: { conditions } }, manager, force: false, subresource: 'status' });
  let obj = fm.apply({ current: undefined, applied: pv({ kernelVersion: 'k1' }), manager: 'kubectl', force: false, subresource: '' });
  obj = statusApply('verifier', [cond('Verified', 'True')], obj);
  obj = statusApply('progress', [cond('Progressing', 'False')], obj);
  t.same(((obj['status'] as JsonObject)['conditions'] as JsonObject[]).map((c) => c['type']), ['Verified', 'Progressing']);
  sameJSON(t, fields(obj, 'progress'), {
    'f:status': { 'f:conditions': { 'k:{"type":"Progressing"}': { '.': {}, 'f:lastTransitionTime': {}, 'f:message': {}, 'f:reason': {}, 'f:status': {}, 'f:type': {} } } },
  });
  obj = statusApply('progress', [], obj);
  t.same(((obj['status'] as JsonObject)['conditions'] as JsonObject[]).map((c) => c['type']), ['Verified']);
});

t.test('list-map merge keeps live order and places applied items as structured-merge-diff does', async (t) => {
  const fm = newManager();
  let obj = fm.apply({ current: undefined, applied: pv({ kernelVersion: 'k1' }), manager: 'kubectl', force: false, subresource: '' });
  obj = fm.update({ previous: obj, next: { ...obj, status: { modules: [module('n', 'a'), module('n', 'b'), module('n', 'c')] } }, manager: 'op', subresource: 'status' });
  obj = fm.apply({
    current: obj,
    applied: { apiVersion: API, kind: KIND, metadata: { name: 'pv' }, status: { modules: [module('n', 'c'), module('n', 'x'), module('n', 'a')] } },
    manager: 'ap',
    force: false,
    subresource: 'status',
  });
  t.same(modulesOf(obj).map((m) => m['name']), ['b', 'c', 'x', 'a']);
});

t.test('granular maps metadata.labels / annotations: ownership per key', async (t) => {
  const fm = newManager();
  let obj = fm.apply({ current: undefined, applied: pv({ kernelVersion: 'k1' }, { labels: { a: '1' }, annotations: { note: 'x' } }), manager: 'a', force: false, subresource: '' });
  obj = fm.apply({ current: obj, applied: pv(undefined, { labels: { b: '2' } }), manager: 'b', force: false, subresource: '' });
  t.same((obj['metadata'] as JsonObject)['labels'], { a: '1', b: '2' });
  sameJSON(t, fields(obj, 'b'), { 'f:metadata': { 'f:labels': { 'f:b': {} } } });
  const err = t.throws(() => fm.apply({ current: obj, applied: pv(undefined, { labels: { a: 'changed' } }), manager: 'b', force: false, subresource: '' })) as ApplyConflictError;
  t.same(err.conflicts.map((c) => c.field), ['.metadata.labels.a']);
  // a drops its label and its annotation; b's label stays; the emptied annotations map stays empty.
  obj = fm.apply({ current: obj, applied: pv({ kernelVersion: 'k1' }), manager: 'a', force: false, subresource: '' });
  t.same((obj['metadata'] as JsonObject)['labels'], { b: '2' });
  t.notOk('annotations' in (obj['metadata'] as JsonObject), 'annotations owned by nobody else: removed whole');
  // An update adding a label owns that key only.
  obj = fm.update({ previous: obj, next: { ...obj, metadata: { ...(obj['metadata'] as JsonObject), labels: { b: '2', c: '3' } } }, manager: 'kubectl-label', subresource: '' });
  sameJSON(t, fields(obj, 'kubectl-label'), { 'f:metadata': { 'f:labels': { 'f:c': {} } } });
});

t.test('set list metadata.finalizers: items owned by value', async (t) => {
  const fm = newManager();
  let obj = fm.apply({ current: undefined, applied: pv({ kernelVersion: 'k1' }, { finalizers: ['a/one'] }), manager: 'a', force: false, subresource: '' });
  obj = fm.update({ previous: obj, next: { ...obj, metadata: { ...(obj['metadata'] as JsonObject), finalizers: ['a/one', 'op/two'] } }, manager: 'op', subresource: '' });
  sameJSON(t, fields(obj, 'op'), { 'f:metadata': { 'f:finalizers': { 'v:"op/two"': {} } } });
  obj = fm.apply({ current: obj, applied: pv({ kernelVersion: 'k1' }), manager: 'a', force: false, subresource: '' });
  t.same((obj['metadata'] as JsonObject)['finalizers'], ['op/two']);
});

t.test('status subresource: status writes only own status; main writes never own status (reset fields)', async (t) => {
  const fm = newManager();
  // Main-resource apply with a status the caller did not strip: status is not owned.
  let obj = fm.apply({
    current: undefined,
    applied: pv({ kernelVersion: 'k1' }, {}, { kernelVersion: 'ignored' }),
    manager: 'kubectl',
    force: false,
    subresource: '',
  });
  sameJSON(t, fields(obj, 'kubectl'), { 'f:spec': { 'f:kernelVersion': {} } });
  // The caller's strategy drops status on create; emulate it.
  delete obj['status'];

  // A status update that (wrongly) also changes spec: only status is recorded.
  obj = fm.update({
    previous: obj,
    next: { ...obj, spec: { kernelVersion: 'k2' }, status: { kernelVersion: 'k1', observedGeneration: 1 } },
    manager: 'op',
    subresource: 'status',
  });
  sameJSON(t, fields(obj, 'op'), { 'f:status': { '.': {}, 'f:kernelVersion': {}, 'f:observedGeneration': {} } });
  t.equal(entry(obj, 'op')?.subresource, 'status');
  sameJSON(t, fields(obj, 'kubectl'), { 'f:spec': { 'f:kernelVersion': {} } }, 'spec ownership untouched by the status write');

  // A main-resource update that changes status does not take it either.
  const main = fm.update({ previous: obj, next: { ...obj, status: { kernelVersion: 'other', observedGeneration: 1 } }, manager: 'kubectl-edit', subresource: '' });
  t.equal(entry(main, 'kubectl-edit'), undefined);
  sameJSON(t, fields(main, 'op'), { 'f:status': { '.': {}, 'f:kernelVersion': {}, 'f:observedGeneration': {} } });

  // Status apply conflicts with the status updater; main apply of status fields is ignored.
  const err = t.throws(() =>
    fm.apply({ current: obj, applied: { apiVersion: API, kind: KIND, metadata: { name: 'pv' }, status: { kernelVersion: 'x' } }, manager: 'b', force: false, subresource: 'status' }),
  ) as ApplyConflictError;
  t.same(err.conflicts, [{ manager: 'op', field: '.status.kernelVersion', operation: 'Update', apiVersion: API, subresource: 'status' }]);
  t.doesNotThrow(() =>
    fm.apply({ current: obj, applied: pv({ kernelVersion: 'k2' }, {}, { kernelVersion: 'x' }), manager: 'b', force: true, subresource: '' }),
  );

  // Same manager name through main and status: two entries.
  const both = fm.apply({ current: obj, applied: { apiVersion: API, kind: KIND, metadata: { name: 'pv' }, status: { counts: { total: 1 } } }, manager: 'kubectl', force: false, subresource: 'status' });
  t.same(
    entries(both).filter((e) => e.manager === 'kubectl').map((e) => e.subresource ?? ''),
    ['', 'status'],
  );
});

t.test('managedFields sent in an update: honoured, reset with [] or [{}], ignored when invalid or through a subresource', async (t) => {
  const fm = newManager();
  const base = fm.apply({ current: undefined, applied: pv({ kernelVersion: 'k1' }, { labels: { a: '1' } }), manager: 'kubectl', force: false, subresource: '' });
  const withMF = (mf: unknown) => ({ ...base, metadata: { ...(base['metadata'] as JsonObject), managedFields: mf } });

  const cleared = fm.update({ previous: base, next: withMF([{}]), manager: 'kubectl-edit', subresource: '' });
  t.notOk('managedFields' in (cleared['metadata'] as JsonObject), '[{}] clears');
  const clearedEmpty = fm.update({ previous: base, next: withMF([]), manager: 'kubectl-edit', subresource: '' });
  t.notOk('managedFields' in (clearedEmpty['metadata'] as JsonObject), '[] clears too (isResetManagedFields)');
  const omitted = { ...base, metadata: { name: 'pv', labels: { a: '1' } } };
  t.same(entries(fm.update({ previous: base, next: omitted, manager: 'kubectl-edit', subresource: '' })), entries(base), 'omitted: kept');

  const custom: ManagedFieldsEntry[] = [
    { manager: 'someone', operation: 'Update', apiVersion: API, time: at(50), fieldsType: 'FieldsV1', fieldsV1: { 'f:spec': { 'f:kernelVersion': {} }, 'f:metadata': { 'f:labels': { 'f:a': {} } } } },
  ];
  const honoured = fm.update({ previous: base, next: withMF(custom), manager: 'kubectl-edit', subresource: '' });
  sameJSON(t, entries(honoured), [
    { manager: 'someone', operation: 'Update', apiVersion: API, time: at(50), fieldsType: 'FieldsV1', fieldsV1: { 'f:metadata': { 'f:labels': { 'f:a': {} } }, 'f:spec': { 'f:kernelVersion': {} } } },
  ], 'client entries taken, re-serialised in kube order');

  const invalid = fm.update({ previous: base, next: withMF([{ manager: 'x', operation: 'Bogus', apiVersion: API, fieldsType: 'FieldsV1', fieldsV1: {} }]), manager: 'kubectl-edit', subresource: '' });
  t.same(entries(invalid), entries(base), 'undecodable: the live ones are kept');
  const viaStatus = fm.update({ previous: base, next: withMF([{}]), manager: 'op', subresource: 'status' });
  t.same(entries(viaStatus), entries(base), 'a subresource never takes managedFields from the request');

  // Reset together with a change: only the writer's new entry remains.
  const resetAndChange = fm.update({ previous: base, next: { ...withMF([{}]), spec: { kernelVersion: 'k2' } }, manager: 'kubectl-edit', subresource: '' });
  t.same(entries(resetAndChange).map((e) => e.manager), ['kubectl-edit']);
});

t.test('apply rejects managedFields in the body (400)', async (t) => {
  const fm = newManager();
  t.throws(
    () => fm.apply({ current: undefined, applied: pv({ kernelVersion: 'k' }, { managedFields: [{ manager: 'x' }] }), manager: 'a', force: false, subresource: '' }),
    new ApplyBadRequestError('metadata.managedFields must be nil'),
  );
});

t.test('values the list keys cannot index are rejected as structured-merge-diff words it', async (t) => {
  const fm = newManager();
  const obj = fm.apply({ current: undefined, applied: pv({ kernelVersion: 'k' }), manager: 'a', force: false, subresource: '' });
  const statusApply = (modules: unknown[]) => () =>
    fm.apply({ current: obj, applied: { apiVersion: API, kind: KIND, metadata: { name: 'pv' }, status: { modules } }, manager: 'a', force: false, subresource: 'status' });
  t.throws(statusApply([{ name: 'm' }]), new FieldManagerError('.status.modules', 'element 0: associative list with keys has an element that omits key field "namespace" (and doesn\'t have default value)'));
  t.throws(statusApply([module('n', 'm'), module('n', 'm')]), new FieldManagerError('.status.modules', 'duplicate entries for key [name="m",namespace="n"]'));
  t.throws(
    () => fm.apply({ current: obj, applied: pv({ kernelVersion: 'k' }, { finalizers: [{}] }), manager: 'a', force: false, subresource: '' }),
    /metadata\.finalizers: element 0: associative list without keys has an element that's a map type/,
  );

  // update() cannot fail: the managedFields of the live object are kept (UpdateNoErrors).
  const errors: Error[] = [];
  const quiet = newManager({ onUpdateError: (e) => errors.push(e) });
  const kept = quiet.update({ previous: obj, next: { ...obj, status: { modules: [{ name: 'no-namespace' }] } }, manager: 'op', subresource: 'status' });
  t.same(entries(kept), entries(obj));
  t.equal(errors.length, 1);
});

t.test('at most 10 Update entries: the oldest are merged into ancient-changes', async (t) => {
  const fm = newManager();
  let obj = fm.apply({ current: undefined, applied: pv({ kernelVersion: 'k' }), manager: 'kubectl', force: false, subresource: '' });
  for (let i = 1; i <= 11; i++) {
    const labels = { ...((obj['metadata'] as JsonObject)['labels'] as JsonObject | undefined), [`l${i}`]: 'v' };
    obj = fm.update({ previous: obj, next: { ...obj, metadata: { ...(obj['metadata'] as JsonObject), labels } }, manager: `m${i}`, subresource: '' });
  }
  const updates = entries(obj).filter((e) => e.operation === 'Update');
  t.equal(updates.length, 10);
  t.same(updates[0]?.manager, 'ancient-changes');
  sameJSON(t, updates[0]?.fieldsV1, { 'f:metadata': { 'f:labels': { '.': {}, 'f:l1': {}, 'f:l2': {} } } });
  t.same(updates.slice(1).map((e) => e.manager), ['m3', 'm4', 'm5', 'm6', 'm7', 'm8', 'm9', 'm10', 'm11']);
  t.ok(entry(obj, 'kubectl', 'Apply'), 'Apply entries are not capped');
});

t.test('large object: 10,000 items in status.modules, one item changed', async (t) => {
  const fm = newManager();
  const modules = Array.from({ length: 10_000 }, (_, i) => module(`ns${i % 50}`, `module-${i}`, { statusReason: 'verified', lastTransitionTime: at(0) }));
  let obj = fm.apply({ current: undefined, applied: pv({ kernelVersion: 'k' }), manager: 'kubectl', force: false, subresource: '' });
  obj = fm.update({ previous: obj, next: { ...obj, status: { modules } }, manager: 'kmm-operator', subresource: 'status' });
  // As the store gives it back: a fresh parse.
  const stored = JSON.parse(JSON.stringify(obj)) as JsonObject;

  const next = JSON.parse(JSON.stringify(stored)) as JsonObject;
  delete (next['metadata'] as JsonObject)['managedFields'];
  const changed = modulesOf(next)[4242] as JsonObject;
  changed['statusReason'] = 'rebuilt';
  let start = performance.now();
  const updated = fm.update({ previous: stored, next, manager: 'rebuilder', subresource: 'status' });
  const updateMs = performance.now() - start;
  sameJSON(t, fields(updated, 'rebuilder'), { 'f:status': { 'f:modules': { 'k:{"name":"module-4242","namespace":"ns42"}': { 'f:statusReason': {} } } } });
  const op = fields(updated, 'kmm-operator') as JsonObject;
  const opModules = (op['f:status'] as JsonObject)['f:modules'] as JsonObject;
  t.equal(Object.keys(opModules).length, 10_001, 'operator keeps the other 9,999 items (and ".")');
  t.same(opModules['k:{"name":"module-4242","namespace":"ns42"}'], { '.': {}, 'f:lastTransitionTime': {}, 'f:name': {}, 'f:namespace': {}, 'f:verificationStage': {}, 'f:verificationStatus': {} });

  start = performance.now();
  const applied = fm.apply({
    current: JSON.parse(JSON.stringify(updated)) as JsonObject,
    applied: { apiVersion: API, kind: KIND, metadata: { name: 'pv' }, status: { modules: [module('ns7', 'module-7', { statusReason: 'verified', lastTransitionTime: at(0) })] } },
    manager: 'checker',
    force: false,
    subresource: 'status',
  });
  const applyMs = performance.now() - start;
  t.equal(modulesOf(applied).length, 10_000);
  t.comment(`update of one item among 10,000: ${updateMs.toFixed(1)} ms; apply of one item: ${applyMs.toFixed(1)} ms`);
});
