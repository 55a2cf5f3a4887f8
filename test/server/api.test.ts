/**
 * Kubernetes API semantics of the app, through fastify inject() on a real SQLite store.
 */
import t from 'tap';
import { buildTestApp, GV, JSON_HEADERS, lines, PFV, PFVO, pfv, type TestApp } from '../helpers/app.ts';

let h: TestApp;
t.beforeEach(async () => {
  h = await buildTestApp({ bookmarkIntervalMs: 100 });
});
t.afterEach(async () => {
  await h.close();
});

const create = (body: unknown, query = '') =>
  h.app.inject({ method: 'POST', url: `${PFV}${query}`, headers: JSON_HEADERS, payload: JSON.stringify(body) });

t.test('legacy and aggregated discovery', async (t) => {
  const legacy = await h.app.inject({ method: 'GET', url: '/apis', headers: { accept: 'application/json' } });
  t.equal(legacy.json().kind, 'APIGroupList');
  t.same(legacy.json().groups[0].preferredVersion, { groupVersion: 'kmm.sigs.x-k8s.io/v1beta2', version: 'v1beta2' });

  const v2 = await h.app.inject({
    method: 'GET',
    url: '/apis',
    headers: { accept: 'application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,application/json' },
  });
  t.equal(v2.headers['content-type'], 'application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList');
  const res = v2.json().items[0].versions[0].resources;
  t.same(
    res.map((r: { resource: string; shortNames: string[]; scope: string }) => [r.resource, r.shortNames, r.scope]),
    [
      ['preflightvalidations', ['pfv'], 'Cluster'],
      ['preflightvalidationsocp', ['pfvo'], 'Cluster'],
    ],
  );
  t.same(res[0].responseKind, { group: 'kmm.sigs.x-k8s.io', version: 'v1beta2', kind: 'PreflightValidation' });
  t.equal(res[0].subresources[0].subresource, 'status');

  const list = (await h.app.inject({ method: 'GET', url: GV })).json();
  t.same(
    list.resources.map((r: { name: string }) => r.name),
    ['preflightvalidations', 'preflightvalidations/status', 'preflightvalidationsocp', 'preflightvalidationsocp/status'],
  );
  t.equal((await h.app.inject({ method: 'GET', url: '/apis/kmm.sigs.x-k8s.io' })).json().kind, 'APIGroup');
  t.equal((await h.app.inject({ method: 'GET', url: '/apis/other.io/v1' })).statusCode, 404);
});

t.test('OpenAPI v3 carries the GVK and the fieldValidation parameter kubectl probes for', async (t) => {
  const index = (await h.app.inject({ method: 'GET', url: '/openapi/v3' })).json();
  const ref = index.paths['apis/kmm.sigs.x-k8s.io/v1beta2'].serverRelativeURL as string;
  t.match(ref, /^\/openapi\/v3\/apis\/kmm\.sigs\.x-k8s\.io\/v1beta2\?hash=[0-9A-F]+$/);
  const doc = (await h.app.inject({ method: 'GET', url: ref })).json();
  const patch = doc.paths['/apis/kmm.sigs.x-k8s.io/v1beta2/preflightvalidations/{name}'].patch;
  t.same(patch['x-kubernetes-group-version-kind'], { group: 'kmm.sigs.x-k8s.io', version: 'v1beta2', kind: 'PreflightValidation' });
  t.ok(patch.parameters.some((p: { name: string }) => p.name === 'fieldValidation'));
  t.notOk('application/strategic-merge-patch+json' in patch.requestBody.content, 'kubectl apply then uses merge patch');
  const schema = doc.components.schemas['io.x-k8s.sigs.kmm.v1beta2.PreflightValidation'];
  t.same(schema['x-kubernetes-group-version-kind'], [{ group: 'kmm.sigs.x-k8s.io', version: 'v1beta2', kind: 'PreflightValidation' }]);
  const status = doc.components.schemas['io.x-k8s.sigs.kmm.v1beta2.PreflightValidationStatus'];
  t.equal(status.properties.modules['x-kubernetes-list-type'], 'map');
  t.same(status.properties.modules['x-kubernetes-list-map-keys'], ['namespace', 'name']);
  t.notOk(JSON.stringify(doc).includes('errorMessage'), 'validation-only keywords are not published');

  const v2 = await h.app.inject({ method: 'GET', url: '/openapi/v2', headers: { accept: 'application/json' } });
  t.equal(v2.json().swagger, '2.0', 'the aggregator fetches v2 as JSON');
  const pb = await h.app.inject({ method: 'GET', url: '/openapi/v2', headers: { accept: 'application/com.github.proto-openapi.spec.v2@v1.0+protobuf' } });
  t.equal(pb.statusCode, 406, 'protobuf-only v2 is not acceptable (kubectl then relies on v3)');
});

t.test('create sets server metadata, defaults, and drops status', async (t) => {
  const r = await create({ ...pfv('a'), status: { kernelVersion: 'x' } });
  t.equal(r.statusCode, 201);
  const o = r.json();
  t.match(o.metadata, { name: 'a', generation: 1, resourceVersion: /^\d+$/, uid: /^[0-9a-f-]{36}$/, creationTimestamp: /Z$/ });
  t.equal(o.spec.pushBuiltImage, false);
  t.notOk('status' in o);
  t.equal((await create(pfv('a'))).json().reason, 'AlreadyExists');
});

t.test('generateName makes a unique name', async (t) => {
  const body = pfv('');
  delete (body.metadata as { name?: string }).name;
  (body.metadata as Record<string, string>)['generateName'] = 'upgrade-';
  const a = (await create(body)).json();
  const b = (await create(body)).json();
  t.match(a.metadata.name, /^upgrade-[bcdfghjklmnpqrstvwxz2456789]{5}$/);
  t.not(a.metadata.name, b.metadata.name);
});

t.test('validation errors are 422 with field causes; OCP releaseImage must be an image reference', async (t) => {
  const r = await create(pfv('bad', { spec: { kernelVersion: 'tesdt', pushBuiltImage: 'yes' } }));
  t.equal(r.statusCode, 422);
  t.same(r.json().details.causes.map((c: { field: string }) => c.field).sort(), ['spec.kernelVersion', 'spec.pushBuiltImage']);
  const noKernel = await create({ apiVersion: 'kmm.sigs.x-k8s.io/v1beta2', kind: 'PreflightValidation', metadata: { name: 'x' }, spec: {} });
  t.match(noKernel.json().message, /spec\.kernelVersion: Required value/);
  const badName = await create(pfv('Bad_Name'));
  t.match(badName.json().details.causes[0], { field: 'metadata.name' });
  for (const [image, ok] of [
    ['quay.io/openshift-release-dev/ocp-release@sha256:22e149142517dfccb47be828f012659b1ccf71d26620e6f62468c264a7ce7863', true],
    ['registry.local:5000/ocp/release:4.16.3-x86_64', true],
    ['not a reference', false],
    ['quay.io/x@sha256:short', false],
  ] as const) {
    const r = await h.app.inject({
      method: 'POST',
      url: PFVO,
      headers: JSON_HEADERS,
      payload: JSON.stringify({ apiVersion: 'kmm.sigs.x-k8s.io/v1beta2', kind: 'PreflightValidationOCP', metadata: { generateName: 'o-' }, spec: { releaseImage: image } }),
    });
    t.equal(r.statusCode, ok ? 201 : 422, image);
    if (!ok) t.equal(r.json().details.causes[0].field, 'spec.releaseImage');
  }
});

t.test('a Module listed twice in status.modules is a Duplicate value', async (t) => {
  await create(pfv('dup'));
  const mod = { namespace: 'a', name: 'b', verificationStatus: 'True', verificationStage: 'Done' };
  const r = await h.app.inject({
    method: 'PATCH',
    url: `${PFV}/dup/status`,
    headers: { 'content-type': 'application/merge-patch+json' },
    payload: JSON.stringify({ status: { modules: [mod, { ...mod }] } }),
  });
  t.equal(r.statusCode, 422);
  t.match(r.json().details.causes, [{ reason: 'FieldValueDuplicate', field: 'status.modules[1]' }]);
});

t.test('fieldValidation Strict rejects, Warn warns, Ignore drops unknown fields', async (t) => {
  const body = pfv('u', { spec: { bogus: 1 } });
  const strict = await create(body, '?fieldValidation=Strict');
  t.equal(strict.statusCode, 400);
  t.match(strict.json().message, /strict decoding error: unknown field "spec.bogus"/);
  const warn = await create(body, '?fieldValidation=Warn');
  t.equal(warn.statusCode, 201);
  t.match(String(warn.headers['warning']), /299 - "unknown field \\"spec.bogus\\""/);
  t.notOk('bogus' in warn.json().spec, 'unknown fields are pruned');
  await h.app.inject({ method: 'DELETE', url: `${PFV}/u` });
  const ignore = await create(body, '?fieldValidation=Ignore');
  t.equal(ignore.statusCode, 201);
  t.notOk(ignore.headers['warning']);
  t.equal((await create(body, '?fieldValidation=Loose')).statusCode, 400);
});

t.test('dryRun=All validates and answers without storing', async (t) => {
  const r = await create(pfv('dry'), '?dryRun=All');
  t.equal(r.statusCode, 201);
  t.equal(r.json().metadata.name, 'dry');
  t.equal((await h.app.inject({ method: 'GET', url: `${PFV}/dry` })).statusCode, 404);
  await create(pfv('real'));
  const del = await h.app.inject({ method: 'DELETE', url: `${PFV}/real?dryRun=All` });
  t.equal(del.statusCode, 200);
  t.equal((await h.app.inject({ method: 'GET', url: `${PFV}/real` })).statusCode, 200, 'a dry-run delete keeps the object');
  t.equal((await create(pfv('x'), '?dryRun=Some')).statusCode, 400);
});

t.test('spec and status are separate: main writes keep status, status writes keep spec, generation follows spec', async (t) => {
  const o = (await create(pfv('s'))).json();
  const statusPut = await h.app.inject({
    method: 'PUT',
    url: `${PFV}/s/status`,
    headers: JSON_HEADERS,
    payload: JSON.stringify({ ...o, spec: { kernelVersion: '9.9.9-x' }, status: { kernelVersion: '6.1.0-18-amd64' } }),
  });
  t.equal(statusPut.statusCode, 200);
  t.equal(statusPut.json().spec.kernelVersion, '6.1.0-18-amd64', 'spec is ignored by /status');
  t.equal(statusPut.json().status.kernelVersion, '6.1.0-18-amd64');
  t.equal(statusPut.json().metadata.generation, 1, 'a status write does not bump the generation');
  const cur = statusPut.json();
  const mainPut = await h.app.inject({
    method: 'PUT',
    url: `${PFV}/s`,
    headers: JSON_HEADERS,
    payload: JSON.stringify({ ...cur, spec: { kernelVersion: '6.2.0-1-amd64' }, status: { kernelVersion: 'overwritten?' } }),
  });
  t.equal(mainPut.json().status.kernelVersion, '6.1.0-18-amd64', 'status is ignored by the main resource');
  t.equal(mainPut.json().metadata.generation, 2);
  const labelOnly = await h.app.inject({
    method: 'PATCH',
    url: `${PFV}/s`,
    headers: { 'content-type': 'application/merge-patch+json' },
    payload: JSON.stringify({ metadata: { labels: { a: 'b' } } }),
  });
  t.equal(labelOnly.json().metadata.generation, 2, 'metadata changes do not bump the generation');
});

t.test('optimistic concurrency: stale resourceVersion is 409, missing one is 422', async (t) => {
  const o = (await create(pfv('c'))).json();
  await h.app.inject({ method: 'PATCH', url: `${PFV}/c`, headers: { 'content-type': 'application/merge-patch+json' }, payload: '{"metadata":{"labels":{"x":"y"}}}' });
  const stale = await h.app.inject({ method: 'PUT', url: `${PFV}/c`, headers: JSON_HEADERS, payload: JSON.stringify(o) });
  t.equal(stale.statusCode, 409);
  t.match(stale.json().message, /the object has been modified/);
  const { resourceVersion: _rv, ...meta } = o.metadata;
  const noRv = await h.app.inject({ method: 'PUT', url: `${PFV}/c`, headers: JSON_HEADERS, payload: JSON.stringify({ ...o, metadata: meta }) });
  t.equal(noRv.statusCode, 422);
  const pinned = await h.app.inject({
    method: 'PATCH',
    url: `${PFV}/c`,
    headers: { 'content-type': 'application/merge-patch+json' },
    payload: JSON.stringify({ metadata: { resourceVersion: o.metadata.resourceVersion }, spec: { pushBuiltImage: true } }),
  });
  t.equal(pinned.statusCode, 409, 'a patch that pins an old resourceVersion conflicts');
  const wrongName = await h.app.inject({ method: 'PUT', url: `${PFV}/other`, headers: JSON_HEADERS, payload: JSON.stringify(o) });
  t.equal(wrongName.statusCode, 400);
});

t.test('patch formats: JSON patch test failure is 422, unknown content type is 415, strategic works as merge', async (t) => {
  await create(pfv('p'));
  const failing = await h.app.inject({
    method: 'PATCH',
    url: `${PFV}/p`,
    headers: { 'content-type': 'application/json-patch+json' },
    payload: JSON.stringify([{ op: 'test', path: '/spec/kernelVersion', value: 'nope' }]),
  });
  t.equal(failing.statusCode, 422);
  const unsupported = await h.app.inject({ method: 'PATCH', url: `${PFV}/p`, headers: { 'content-type': 'text/plain' }, payload: 'x' });
  t.equal(unsupported.statusCode, 415);
  t.equal(unsupported.json().reason, 'UnsupportedMediaType');
  const smp = await h.app.inject({
    method: 'PATCH',
    url: `${PFV}/p`,
    headers: { 'content-type': 'application/strategic-merge-patch+json' },
    payload: JSON.stringify({ metadata: { labels: { a: '1' }, $setElementOrder: undefined }, spec: { pushBuiltImage: true } }),
  });
  t.equal(smp.statusCode, 200);
  t.equal(smp.json().spec.pushBuiltImage, true);
  const notFound = await h.app.inject({ method: 'PATCH', url: `${PFV}/none`, headers: { 'content-type': 'application/merge-patch+json' }, payload: '{}' });
  t.equal(notFound.statusCode, 404);
});

t.test('server-side apply creates, records managedFields, and reports conflicts as 409 with causes', async (t) => {
  const apply = (body: unknown, manager: string, force = false) =>
    h.app.inject({
      method: 'PATCH',
      url: `${PFV}/ssa?fieldManager=${manager}${force ? '&force=true' : ''}`,
      headers: { 'content-type': 'application/apply-patch+yaml' },
      payload: JSON.stringify(body),
    });
  const first = await apply(pfv('ssa'), 'alice');
  t.equal(first.statusCode, 201);
  t.match(first.json().metadata.managedFields, [{ manager: 'alice', operation: 'Apply', fieldsType: 'FieldsV1' }]);
  const conflict = await apply(pfv('ssa', { spec: { kernelVersion: '6.2.0-1-amd64' } }), 'bob');
  t.equal(conflict.statusCode, 409);
  t.match(conflict.json().message, /Apply failed with 1 conflict: conflict with "alice": \.spec\.kernelVersion/);
  t.match(conflict.json().details.causes, [{ reason: 'FieldManagerConflict', field: '.spec.kernelVersion' }]);
  const forced = await apply(pfv('ssa', { spec: { kernelVersion: '6.2.0-1-amd64' } }), 'bob', true);
  t.equal(forced.statusCode, 200);
  t.equal(forced.json().spec.kernelVersion, '6.2.0-1-amd64');
  const noManager = await h.app.inject({ method: 'PATCH', url: `${PFV}/ssa`, headers: { 'content-type': 'application/apply-patch+yaml' }, payload: JSON.stringify(pfv('ssa')) });
  t.equal(noManager.statusCode, 422, 'apply requires a fieldManager');
  const again = await apply(pfv('ssa', { spec: { kernelVersion: '6.2.0-1-amd64' } }), 'bob');
  t.equal(again.json().metadata.resourceVersion, forced.json().metadata.resourceVersion, 'an apply that changes nothing does not write');
  const cached = await h.app.inject({ method: 'GET', url: `${PFV}/ssa` });
  t.same(cached.json(), forced.json(), 'and leaves the stored object untouched');
  const statusApply = await h.app.inject({
    method: 'PATCH',
    url: `${PFV}/ssa/status?fieldManager=controller`,
    headers: { 'content-type': 'application/apply-patch+yaml' },
    payload: JSON.stringify({ ...pfv('ssa'), status: { kernelVersion: '6.2.0-1-amd64' } }),
  });
  t.equal(statusApply.statusCode, 200);
  t.equal(statusApply.json().status.kernelVersion, '6.2.0-1-amd64');
  t.equal(statusApply.json().spec.kernelVersion, '6.2.0-1-amd64', 'apply to /status does not touch spec');
  t.ok(
    statusApply.json().metadata.managedFields.some(
      (m: { manager: string; operation: string; subresource?: string }) => m.manager === 'controller' && m.operation === 'Apply' && m.subresource === 'status',
    ),
    'the status apply is recorded with its subresource',
  );
  const yamlApply = await h.app.inject({
    method: 'PATCH',
    url: `${PFV}/ssa?fieldManager=bob`,
    headers: { 'content-type': 'application/apply-patch+yaml' },
    payload: 'apiVersion: kmm.sigs.x-k8s.io/v1beta2\nkind: PreflightValidation\nmetadata:\n  name: ssa\nspec:\n  kernelVersion: 6.3.0-1-amd64\n',
  });
  t.equal(yamlApply.json().spec.kernelVersion, '6.3.0-1-amd64', 'YAML bodies are applied');
});

t.test('list with label and field selectors; unsupported fields are 400', async (t) => {
  await create(pfv('a1', { metadata: { labels: { team: 'gpu' } } }));
  await create(pfv('a2', { metadata: { labels: { team: 'nic' } } }));
  const names = async (q: string) => (await h.app.inject({ method: 'GET', url: `${PFV}?${q}` })).json().items.map((i: { metadata: { name: string } }) => i.metadata.name);
  t.same(await names('labelSelector=team%3Dgpu'), ['a1']);
  t.same(await names('labelSelector=team%20notin%20(gpu)'), ['a2']);
  t.same(await names('fieldSelector=metadata.name%3Da2'), ['a2']);
  t.equal((await h.app.inject({ method: 'GET', url: `${PFV}?fieldSelector=spec.kernelVersion%3Dx` })).statusCode, 400);
});

t.test('list chunking with limit and continue reads one snapshot; an expired continue is 410', async (t) => {
  for (let i = 0; i < 5; i++) await create(pfv(`n${i}`));
  const page1 = (await h.app.inject({ method: 'GET', url: `${PFV}?limit=2` })).json();
  t.same(page1.items.map((i: { metadata: { name: string } }) => i.metadata.name), ['n0', 'n1']);
  t.ok(page1.metadata.continue);
  await h.app.inject({ method: 'DELETE', url: `${PFV}/n3` });
  await create(pfv('n5'));
  const page2 = (await h.app.inject({ method: 'GET', url: `${PFV}?limit=2&continue=${page1.metadata.continue}` })).json();
  t.same(page2.items.map((i: { metadata: { name: string } }) => i.metadata.name), ['n2', 'n3'], 'the snapshot still has n3');
  const page3 = (await h.app.inject({ method: 'GET', url: `${PFV}?limit=2&continue=${page2.metadata.continue}` })).json();
  t.same(page3.items.map((i: { metadata: { name: string } }) => i.metadata.name), ['n4'], 'and not n5');
  t.notOk(page3.metadata.continue);
  h.store.compact(await h.store.currentRevision());
  const expired = await h.app.inject({ method: 'GET', url: `${PFV}?limit=2&continue=${page1.metadata.continue}` });
  t.equal(expired.statusCode, 410);
  t.equal(expired.json().reason, 'Expired');
  t.equal((await h.app.inject({ method: 'GET', url: `${PFV}?continue=garbage` })).statusCode, 400);
});

t.test('Table, PartialObjectMetadata and PartialObjectMetadataList; protobuf-first Accept gets JSON', async (t) => {
  await create(pfv('t1'));
  const table = await h.app.inject({
    method: 'GET',
    url: PFV,
    headers: { accept: 'application/json;as=Table;v=v1;g=meta.k8s.io,application/json' },
  });
  const tb = table.json();
  t.equal(tb.kind, 'Table');
  t.same(tb.columnDefinitions.map((c: { name: string }) => c.name), ['Name', 'Kernel', 'Verified', 'Failed', 'Pending', 'Age', 'Errors', 'Total', 'Push', 'Status']);
  t.same(tb.columnDefinitions.map((c: { priority: number }) => c.priority), [0, 0, 0, 0, 0, 0, 1, 1, 1, 1]);
  t.equal(tb.rows[0].object.kind, 'PartialObjectMetadata');
  t.ok(tb.metadata.resourceVersion);
  const full = await h.app.inject({ method: 'GET', url: `${PFV}?includeObject=Object`, headers: { accept: 'application/json;as=Table;v=v1;g=meta.k8s.io' } });
  t.equal(full.json().rows[0].object.kind, 'PreflightValidation');
  const pom = await h.app.inject({ method: 'GET', url: `${PFV}/t1`, headers: { accept: 'application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1' } });
  t.same(Object.keys(pom.json()), ['kind', 'apiVersion', 'metadata']);
  const poml = await h.app.inject({ method: 'GET', url: PFV, headers: { accept: 'application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1' } });
  t.equal(poml.json().kind, 'PartialObjectMetadataList');
  t.equal(poml.json().items[0].metadata.name, 't1');
  const pb = await h.app.inject({ method: 'GET', url: `${PFV}/t1`, headers: { accept: 'application/vnd.kubernetes.protobuf, */*' } });
  t.equal(pb.statusCode, 200);
  t.equal(pb.headers['content-type'], 'application/json');
  const yaml = await h.app.inject({ method: 'GET', url: `${PFV}/t1`, headers: { accept: 'application/yaml' } });
  t.match(yaml.body, /^apiVersion: kmm\.sigs\.x-k8s\.io\/v1beta2\nkind: PreflightValidation/);
  t.equal((await h.app.inject({ method: 'GET', url: `${PFV}/t1`, headers: { accept: 'text/html' } })).statusCode, 406);
});

t.test('watch: initial ADDED from "0", replay from a resourceVersion, bookmarks, and selector transitions', async (t) => {
  await create(pfv('w0'));
  await h.app.inject({ method: 'DELETE', url: `${PFV}/w0` });
  const a = (await create(pfv('w1', { metadata: { labels: { team: 'gpu' } } }))).json();
  await h.app.inject({ method: 'PATCH', url: `${PFV}/w1`, headers: { 'content-type': 'application/merge-patch+json' }, payload: '{"metadata":{"labels":{"team":"nic"}}}' });
  await h.app.inject({ method: 'DELETE', url: `${PFV}/w1` });

  const fromZero = lines((await h.app.inject({ method: 'GET', url: `${PFV}?watch=true&timeoutSeconds=1` })).body);
  t.same(fromZero, [], 'nothing exists: no synthetic events');

  const replay = lines((await h.app.inject({ method: 'GET', url: `${PFV}?watch=true&resourceVersion=0&timeoutSeconds=1` })).body);
  t.same(replay.map((e) => e.type), []);

  const fromRv = lines((await h.app.inject({ method: 'GET', url: `${PFV}?watch=true&resourceVersion=${Number(a.metadata.resourceVersion) - 1}&timeoutSeconds=1` })).body);
  t.same(fromRv.map((e) => e.type), ['ADDED', 'MODIFIED', 'DELETED']);

  const selected = lines(
    (await h.app.inject({ method: 'GET', url: `${PFV}?watch=true&labelSelector=team%3Dgpu&resourceVersion=${Number(a.metadata.resourceVersion) - 1}&timeoutSeconds=1` })).body,
  );
  t.same(selected.map((e) => e.type), ['ADDED', 'DELETED'], 'an object that stops matching is sent as DELETED, and only once');

  await create(pfv('w2'));
  const initial = lines((await h.app.inject({ method: 'GET', url: `${PFV}?watch=true&timeoutSeconds=1` })).body);
  t.same(initial.map((e) => `${e.type}:${e.object.metadata.name}`), ['ADDED:w2'], 'a watch without resourceVersion starts with the current objects');

  const bookmarks = lines((await h.app.inject({ method: 'GET', url: `${PFV}?watch=true&allowWatchBookmarks=true&timeoutSeconds=1` })).body);
  const bm = bookmarks.filter((e) => e.type === 'BOOKMARK');
  t.ok(bm.length >= 1, 'bookmarks arrive while idle');
  t.match(bm[0]!.object, { kind: 'PreflightValidation', metadata: { resourceVersion: /^\d+$/ } });

  const sie = lines(
    (await h.app.inject({ method: 'GET', url: `${PFV}?watch=true&sendInitialEvents=true&resourceVersionMatch=NotOlderThan&allowWatchBookmarks=true&timeoutSeconds=1` })).body,
  );
  t.equal(sie[0]!.type, 'ADDED');
  t.same(sie[1], { type: 'BOOKMARK', object: { kind: 'PreflightValidation', apiVersion: 'kmm.sigs.x-k8s.io/v1beta2', metadata: { resourceVersion: sie[1]!.object.metadata.resourceVersion, creationTimestamp: null, annotations: { 'k8s.io/initial-events-end': 'true' } } } });

  const tableWatch = lines(
    (await h.app.inject({ method: 'GET', url: `${PFV}?watch=true&timeoutSeconds=1`, headers: { accept: 'application/json;as=Table;v=v1;g=meta.k8s.io' } })).body,
  );
  t.equal(tableWatch[0]!.object.kind, 'Table');
  t.equal(tableWatch[0]!.object.rows[0].cells[0], 'w2');
});

t.test('watch from a compacted resourceVersion gets 410 Expired as an ERROR event', async (t) => {
  const a = (await create(pfv('e1'))).json();
  await create(pfv('e2'));
  h.store.compact(await h.store.currentRevision());
  const r = await h.app.inject({ method: 'GET', url: `${PFV}?watch=true&resourceVersion=${a.metadata.resourceVersion}&timeoutSeconds=1` });
  t.equal(r.statusCode, 200);
  const ev = lines(r.body);
  t.equal(ev.length, 1);
  t.equal(ev[0]!.type, 'ERROR');
  t.match(ev[0]!.object, { kind: 'Status', code: 410, reason: 'Expired' });
});

t.test('delete: finalizers hold the object, preconditions are checked, Orphan adds its finalizer, deletecollection', async (t) => {
  const o = (await create(pfv('d1', { metadata: { finalizers: ['example.com/hold'] } }))).json();
  const wrongUid = await h.app.inject({ method: 'DELETE', url: `${PFV}/d1`, headers: JSON_HEADERS, payload: JSON.stringify({ preconditions: { uid: 'nope' } }) });
  t.equal(wrongUid.statusCode, 409);
  const del = await h.app.inject({ method: 'DELETE', url: `${PFV}/d1`, headers: JSON_HEADERS, payload: JSON.stringify({ preconditions: { uid: o.metadata.uid } }) });
  t.equal(del.statusCode, 200);
  t.ok(del.json().metadata.deletionTimestamp);
  const addFinalizer = await h.app.inject({
    method: 'PATCH',
    url: `${PFV}/d1`,
    headers: { 'content-type': 'application/merge-patch+json' },
    payload: JSON.stringify({ metadata: { finalizers: ['example.com/hold', 'example.com/more'] } }),
  });
  t.equal(addFinalizer.statusCode, 422, 'no new finalizers on a deleting object');
  const release = await h.app.inject({ method: 'PATCH', url: `${PFV}/d1`, headers: { 'content-type': 'application/merge-patch+json' }, payload: '{"metadata":{"finalizers":null}}' });
  t.equal(release.statusCode, 200);
  t.equal((await h.app.inject({ method: 'GET', url: `${PFV}/d1` })).statusCode, 404, 'removing the last finalizer deletes');

  await create(pfv('d2'));
  const orphan = await h.app.inject({ method: 'DELETE', url: `${PFV}/d2?propagationPolicy=Orphan` });
  t.same(orphan.json().metadata.finalizers, ['orphan']);

  await create(pfv('d3', { metadata: { labels: { batch: 'x' } } }));
  await create(pfv('d4', { metadata: { labels: { batch: 'x' } } }));
  await create(pfv('d5'));
  const coll = await h.app.inject({ method: 'DELETE', url: `${PFV}?labelSelector=batch%3Dx` });
  t.equal(coll.statusCode, 200);
  t.same(coll.json().items.map((i: { metadata: { name: string } }) => i.metadata.name), ['d3', 'd4']);
  t.equal((await h.app.inject({ method: 'GET', url: `${PFV}/d5` })).statusCode, 200);
  t.equal((await h.app.inject({ method: 'DELETE', url: `${PFV}/nope` })).statusCode, 404);
});

t.test('unknown resources are 404 and unsupported methods 405, as Status objects', async (t) => {
  const r404 = await h.app.inject({ method: 'GET', url: `${GV}/nothings` });
  t.equal(r404.statusCode, 404);
  t.equal(r404.json().kind, 'Status');
  const r405 = await h.app.inject({ method: 'POST', url: `${PFV}/x/y/z` });
  t.equal(r405.statusCode, 405);
  t.equal(r405.json().reason, 'MethodNotAllowed');
  t.equal((await h.app.inject({ method: 'GET', url: '/nowhere' })).json().reason, 'NotFound');
});

t.test('metrics are Prometheus text and count requests', async (t) => {
  await create(pfv('m'));
  const m = await h.app.inject({ method: 'GET', url: '/metrics' });
  t.match(m.headers['content-type'], /text\/plain/);
  t.match(m.body, /kmm_preflight_apiserver_requests_total\{verb="create",resource="preflightvalidations",subresource="",code="201"\} 1/);
});
