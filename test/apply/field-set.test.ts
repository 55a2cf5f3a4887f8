import t from 'tap';
import { FieldSet, goJSON, keyPE, pathToString, sortPathElements, valuePE, type JsonObject } from '../../src/apply/field-set.ts';
import { compileSchema, type ListType, type MapType } from '../../src/apply/type-info.ts';
import { compare, merge, prune, toFieldSet, tuning } from '../../src/apply/typed.ts';
import { createFieldManager, KUBE_CRD_RESET_FIELDS, type ManagedFieldsEntry } from '../../src/apply/field-manager.ts';
import { preflightValidationSchema } from './fixtures/preflight-schema.ts';

const set = (...paths: string[]) => FieldSet.of(paths.map((p) => p.split('/')));
const json = (s: FieldSet) => JSON.stringify(s.toFieldsV1());

t.test('set algebra follows structured-merge-diff (difference is path by path, recursiveDifference drops subtrees)', async (t) => {
  const a = set('f:spec/f:a', 'f:spec/f:b', 'f:status');
  const b = set('f:spec/f:b', 'f:status/f:x');
  t.equal(json(FieldSet.union(a, b)), '{"f:spec":{"f:a":{},"f:b":{}},"f:status":{".":{},"f:x":{}}}');
  t.equal(json(FieldSet.difference(a, b)), '{"f:spec":{"f:a":{}},"f:status":{}}');
  t.equal(json(FieldSet.difference(set('f:spec/f:a'), set('f:spec'))), '{"f:spec":{"f:a":{}}}', 'a.b − a keeps a.b');
  t.equal(json(FieldSet.recursiveDifference(set('f:spec/f:a', 'f:status'), set('f:spec'))), '{"f:status":{}}');
  t.equal(json(FieldSet.intersection(a, b)), '{"f:spec":{"f:b":{}}}');
  t.ok(FieldSet.difference(a, a).isEmpty());
  t.equal(FieldSet.union(a, FieldSet.EMPTY), a, 'unchanged results are the same instance');
  t.equal(FieldSet.difference(a, set('f:other')), a);
  t.ok(a.has(['f:spec', 'f:a']));
  t.notOk(a.has(['f:spec']));
});

t.test('path elements sort as PathElement.Compare: fields, then keys, then values, then indexes', async (t) => {
  t.same(sortPathElements(['v:"b"', 'k:{"a":1}', 'f:z', 'i:2', 'f:a', 'v:"a"', 'k:{"a":0}', 'i:10', 'v:1']), [
    'f:a',
    'f:z',
    'k:{"a":0}',
    'k:{"a":1}',
    'v:1',
    'v:"a"',
    'v:"b"',
    'i:2',
    'i:10',
  ]);
  t.same(sortPathElements(['f:b', 'f:B', 'f:a.b', 'f:a']), ['f:B', 'f:a', 'f:a.b', 'f:b'], 'byte order');
  t.same(
    sortPathElements(['k:{"name":"b","namespace":"a"}', 'k:{"name":"a","namespace":"z"}', 'k:{"name":"a"}']),
    ['k:{"name":"a"}', 'k:{"name":"a","namespace":"z"}', 'k:{"name":"b","namespace":"a"}'],
    'key lists compare field by field, shorter first',
  );
  t.equal(keyPE([['namespace', 'ns'], ['name', 'n']]), 'k:{"name":"n","namespace":"ns"}', 'key fields sorted by name');
  t.equal(valuePE('a<b>&c'), 'v:"a\\u003cb\\u003e\\u0026c"', 'Go JSON escapes');
  t.equal(goJSON({ b: 1, a: [true, null] }), '{"a":[true,null],"b":1}');
  t.equal(pathToString(['f:status', 'f:modules', 'k:{"name":"b","namespace":"a"}', 'f:statusReason']), '.status.modules[name="b",namespace="a"].statusReason');
  t.equal(pathToString(['f:metadata', 'f:finalizers', 'v:"x"']), '.metadata.finalizers[="x"]');
});

t.test('FieldsV1 decoding: stored JSON is reused, client JSON is validated and canonicalised', async (t) => {
  const stored = { 'f:metadata': { 'f:labels': { '.': {}, 'f:a': {} } }, 'f:spec': { 'f:x': {} } };
  const s = FieldSet.fromTrustedFieldsV1(stored);
  t.equal(s.toFieldsV1(), stored, 'same object back');
  t.ok(s.has(['f:metadata', 'f:labels']));
  t.ok(s.has(['f:metadata', 'f:labels', 'f:a']));
  const grown = FieldSet.union(s, set('f:metadata/f:labels/f:b'));
  t.equal(JSON.stringify(grown.toFieldsV1()), '{"f:metadata":{"f:labels":{".":{},"f:a":{},"f:b":{}}},"f:spec":{"f:x":{}}}');
  t.equal((grown.toFieldsV1() as JsonObject)['f:spec'], stored['f:spec'], 'untouched subtrees keep their JSON');

  const client = FieldSet.fromUntrustedFieldsV1({ 'f:z': {}, 'f:list': { 'k:{"namespace":"n","name":"a"}': {} } });
  t.equal(json(client), '{"f:list":{"k:{\\"name\\":\\"a\\",\\"namespace\\":\\"n\\"}":{}},"f:z":{}}');
  t.throws(() => FieldSet.fromUntrustedFieldsV1({ 'x:bad': {} }));
  t.throws(() => FieldSet.fromUntrustedFieldsV1({ 'f:a': 1 }));
});

t.test('large sets: binary insertion keeps order without re-sorting', async (t) => {
  const keys = Array.from({ length: 2000 }, (_, i) => keyPE([['name', `m-${String(i).padStart(5, '0')}`]]));
  const stored: JsonObject = { 'f:items': Object.fromEntries(keys.map((k) => [k, { '.': {}, 'f:x': {} }])) };
  const s = FieldSet.fromTrustedFieldsV1(stored);
  const added = FieldSet.union(s, set(`f:items/${keyPE([['name', 'm-00100x']])}`, `f:items/${keyPE([['name', 'a-first']])}`));
  const out = Object.keys((added.toFieldsV1() as JsonObject)['f:items'] as JsonObject);
  t.equal(out.length, 2002);
  t.same(out, sortPathElements([...out]));
  t.equal(out[0], 'k:{"name":"a-first"}');
  t.equal(out[102], 'k:{"name":"m-00100x"}');
});

// -------------------------------------------------------------------------------------------------
// The fast paths of compare/merge/prune give the results of the full algorithm.

function rng(seed: number) {
  let x = seed >>> 0;
  return () => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return (x >>> 0) / 2 ** 32;
  };
}

t.test('fast paths agree with the full algorithm on random lists (moves, edits, duplicates)', async (t) => {
  const root = compileSchema(preflightValidationSchema);
  const modulesType = ((root.fields.get('status') as MapType).fields.get('modules') as ListType);
  const rand = rng(42);
  const pick = <T>(xs: readonly T[]) => xs[Math.floor(rand() * xs.length)] as T;
  const item = () => ({ namespace: pick(['a', 'b']), name: pick(['x', 'y', 'z', 'w', 'v', 'u']), verificationStatus: pick(['True', 'False']), verificationStage: 'Done' });
  const mutate = (list: JsonObject[]) => {
    const out = list.map((m) => ({ ...m }));
    const ops = 1 + Math.floor(rand() * 3);
    for (let i = 0; i < ops; i++) {
      const op = rand();
      const at = Math.floor(rand() * Math.max(out.length, 1));
      if (op < 0.3 && out.length > 0) (out[at] as JsonObject)['verificationStatus'] = pick(['True', 'False', 'Error']);
      else if (op < 0.5 && out.length > 1) {
        const [m] = out.splice(at, 1);
        out.splice(Math.floor(rand() * out.length), 0, m as JsonObject);
      } else if (op < 0.7) out.splice(at, 0, item());
      else if (op < 0.85 && out.length > 0) out.splice(at, 1);
      else if (out.length > 0) out[at] = item();
    }
    return out;
  };
  const wrap = (modules: JsonObject[]) => ({ status: { modules } });
  const asJSON = (c: ReturnType<typeof compare>) => [json(c.added), json(c.modified), json(c.removed)];
  let checked = 0;
  for (let n = 0; n < 400; n++) {
    const size = 1 + Math.floor(rand() * 10);
    const base = Array.from({ length: size }, item);
    const next = mutate(base);
    const saved = tuning.fewItems;
    try {
      tuning.fewItems = -1;
      const full = asJSON(compare(wrap(base), wrap(next), root));
      tuning.fewItems = 8;
      const fast = asJSON(compare(wrap(base), wrap(next), root));
      if (JSON.stringify(full) !== JSON.stringify(fast)) {
        t.same(fast, full, `compare ${JSON.stringify(base)} → ${JSON.stringify(next)}`);
        break;
      }
      // Merge and prune with a small configuration (no duplicate keys in a configuration).
      const config = [...new Map(mutate(base).slice(0, 3).map((m) => [`${m['namespace']}/${m['name']}`, m])).values()];
      let fullMerged: unknown;
      let fullPruned: unknown;
      const last = toFieldSet(wrap(config.slice(0, 2)), root);
      try {
        tuning.fewItems = -1;
        fullMerged = merge(wrap(base), wrap(config), root);
        fullPruned = prune(fullMerged, root, last, [toFieldSet(wrap(config.slice(1)), root)]);
      } catch {
        continue; // duplicate keys in the live list where the full algorithm must key everything
      }
      tuning.fewItems = 8;
      const fastMerged = merge(wrap(base), wrap(config), root);
      const fastPruned = prune(fastMerged, root, last, [toFieldSet(wrap(config.slice(1)), root)]);
      if (JSON.stringify(fastMerged) !== JSON.stringify(fullMerged) || JSON.stringify(fastPruned) !== JSON.stringify(fullPruned)) {
        t.same([fastMerged, fastPruned], [fullMerged, fullPruned], `merge ${JSON.stringify(base)} + ${JSON.stringify(config)}`);
        break;
      }
      checked++;
    } finally {
      tuning.fewItems = saved;
    }
  }
  t.ok(checked > 300, `${checked} random cases agree`);
  t.ok(modulesType.rel === 'map');
});

t.test('compare of list-maps: moves are not changes, duplicates compare as a group', async (t) => {
  const root = compileSchema(preflightValidationSchema);
  const m = (name: string, s = 'True') => ({ namespace: 'n', name, verificationStatus: s, verificationStage: 'Done' });
  const c1 = compare({ status: { modules: [m('a'), m('b'), m('c')] } }, { status: { modules: [m('b'), m('a'), m('c')] } }, root);
  t.ok(c1.added.isEmpty() && c1.modified.isEmpty() && c1.removed.isEmpty(), 'reordering is no change');
  const c2 = compare({ status: { modules: [m('a'), m('a', 'False')] } }, { status: { modules: [m('a'), m('a', 'Error')] } }, root);
  t.equal(json(c2.modified), '{"f:status":{"f:modules":{"k:{\\"name\\":\\"a\\",\\"namespace\\":\\"n\\"}":{}}}}');
  const c3 = compare({ status: { modules: [m('a'), m('b')] } }, { status: { modules: [m('a'), m('c')] } }, root);
  t.equal(json(c3.removed), '{"f:status":{"f:modules":{"k:{\\"name\\":\\"b\\",\\"namespace\\":\\"n\\"}":{".":{},"f:name":{},"f:namespace":{},"f:verificationStage":{},"f:verificationStatus":{}}}}}');
});

t.test('the API schema of src/api compiles to the structure apply needs', async (t) => {
  const { PreflightValidationSchema, PreflightValidationOCPSchema } = await import('../../src/api/schema.ts');
  for (const schema of [PreflightValidationSchema, PreflightValidationOCPSchema]) {
    const root = compileSchema(schema as unknown as JsonObject);
    const status = root.fields.get('status') as MapType;
    const modules = status.fields.get('modules') as ListType;
    t.equal(modules.rel, 'map');
    t.same(modules.keys, ['namespace', 'name']);
    t.equal((status.fields.get('conditions') as ListType).rel, 'map');
  }
  const fm = createFieldManager({ schema: PreflightValidationSchema as unknown as JsonObject, apiVersion: 'kmm.sigs.x-k8s.io/v1beta2', resetFields: KUBE_CRD_RESET_FIELDS });
  const obj = fm.update({
    previous: undefined,
    next: { apiVersion: 'kmm.sigs.x-k8s.io/v1beta2', kind: 'PreflightValidation', metadata: { name: 'pv', labels: { a: 'b' } }, spec: { kernelVersion: '6.1.0-18-amd64' } },
    manager: 'kubectl-create',
    subresource: '',
  });
  const mf = (obj['metadata'] as JsonObject)['managedFields'] as ManagedFieldsEntry[];
  t.equal(JSON.stringify(mf[0]?.fieldsV1), '{"f:metadata":{"f:labels":{".":{},"f:a":{}}},"f:spec":{".":{},"f:kernelVersion":{}}}');
});
