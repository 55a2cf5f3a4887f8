import t from 'tap';
import type { KubeObject } from '../../src/api/resources.ts';
import { API_VERSION, type ModuleStatus } from '../../src/api/schema.ts';
import {
  MAX_FAILING_LISTED,
  createCommand,
  gateCacheStats,
  releaseVerdict,
  suggestedName,
  type GateInputs,
  type GateModule,
} from '../../src/gate/release-verdict.ts';

const DIGEST = `sha256:${'ab'.repeat(32)}`;
const RELEASE = `quay.io/openshift-release-dev/ocp-release@${DIGEST}`;
const T = '2024-07-18T10:00:00Z';

const modulesOf = (n: number): GateModule[] => Array.from({ length: n }, (_, i) => ({ metadata: { namespace: `ns-${i % 100}`, name: `mod-${i}` } }));

const entry = (m: GateModule, verificationStatus: ModuleStatus['verificationStatus'], statusReason = 'ok'): ModuleStatus => ({
  namespace: m.metadata.namespace ?? '',
  name: m.metadata.name,
  verificationStatus,
  verificationStage: verificationStatus === 'True' || verificationStatus === 'False' ? 'Done' : 'Image',
  statusReason,
  lastTransitionTime: T,
});

function validation(name: string, entries: ModuleStatus[], resourceVersion: string, releaseImage = RELEASE): KubeObject {
  return {
    apiVersion: API_VERSION,
    kind: 'PreflightValidationOCP',
    metadata: { name, uid: `uid-${name}`, resourceVersion, generation: 1, creationTimestamp: T },
    spec: { releaseImage },
    status: {
      modules: entries,
      observedGeneration: 1,
      conditions: [{ type: 'Verified', status: 'True', observedGeneration: 1, lastTransitionTime: T, reason: 'AllModulesVerified', message: '' }],
    },
  };
}

/** Inputs whose state the test replaces, as the server's informers would. */
function liveInputs(validations: KubeObject[], modules: readonly GateModule[]) {
  const state = { validations, modules };
  const inputs: GateInputs = { validations: () => state.validations, modules: () => state.modules, digestOf: () => undefined };
  return { state, inputs };
}

t.test('a validation of 10,000 Modules is indexed once and re-checked only when something changes', async (t) => {
  const modules = modulesOf(10_000);
  const { state, inputs } = liveInputs([validation('big', modules.map((m) => entry(m, 'True')), '10')], modules);

  const first = releaseVerdict(RELEASE, inputs);
  t.match(first, { verified: true, reason: 'AllModulesVerified', validation: 'big', moduleCount: 10_000, failingCount: 0 });
  t.match(gateCacheStats(inputs), { indexBuilds: 1, evaluations: 1, objects: 1 });

  for (let i = 0; i < 100; i++) releaseVerdict(RELEASE, inputs);
  t.match(gateCacheStats(inputs), { indexBuilds: 1, evaluations: 1 }, 'repeated decisions reuse the index and the pass over the Modules');

  state.validations = [structuredClone(state.validations[0]!)];
  releaseVerdict(RELEASE, inputs);
  t.match(gateCacheStats(inputs), { indexBuilds: 1, evaluations: 1 }, 'a fresh copy of the same resourceVersion is the same object');

  state.modules = [...modules, { metadata: { namespace: 'late', name: 'newcomer', creationTimestamp: '2024-07-18T11:00:00Z' } }];
  const added = releaseVerdict(RELEASE, inputs);
  t.match(gateCacheStats(inputs), { indexBuilds: 1, evaluations: 2 }, 'new Modules: checked again against the same index');
  t.match(added, { verified: false, failingCount: 1, failing: [{ namespace: 'late', name: 'newcomer', reason: /created after the validation/ }] });

  const changed = structuredClone(state.validations[0]!);
  changed.metadata.resourceVersion = '11';
  changed.status!.modules![5]!.verificationStatus = 'False';
  changed.status!.modules![5]!.statusReason = 'no kernel mapping';
  state.validations = [changed];
  const failing = releaseVerdict(RELEASE, inputs);
  t.match(gateCacheStats(inputs), { indexBuilds: 2, evaluations: 3 }, 'a new resourceVersion is indexed again');
  t.match(failing, { verified: false, failingCount: 2, failing: [{ namespace: 'ns-5', name: 'mod-5', reason: 'no kernel mapping' }, { name: 'newcomer' }] });

  state.validations = [];
  releaseVerdict(RELEASE, inputs);
  t.equal(gateCacheStats(inputs).objects, 0, 'deleted objects are forgotten');
});

t.test('objects that do not match are not indexed', async (t) => {
  const modules = modulesOf(10);
  const other = validation('other', modules.map((m) => entry(m, 'True')), '1', `quay.io/openshift-release-dev/ocp-release@sha256:${'cd'.repeat(32)}`);
  const { inputs } = liveInputs([other], modules);
  t.match(releaseVerdict(RELEASE, inputs), { verified: false, reason: 'NoValidation', failingCount: 10 });
  t.match(gateCacheStats(inputs), { indexBuilds: 0, evaluations: 0 });
});

t.test('failing Modules are listed worst first, capped, and counted in full', async (t) => {
  const modules = modulesOf(40);
  const entries = modules.map((m, i) => (i < 20 ? entry(m, 'Unknown', 'waiting') : i < 30 ? entry(m, 'Error', 'registry answered 503') : entry(m, 'False', `reason ${i}`)));
  entries.splice(0, 1); // mod-0 has no entry at all
  const { inputs } = liveInputs([validation('v', entries, '1')], modules);
  const v = releaseVerdict(RELEASE, inputs);
  t.equal(v.failingCount, 40);
  t.equal(v.failing.length, MAX_FAILING_LISTED);
  t.same(v.failing.slice(0, 3).map((f) => f.reason), ['reason 30', 'reason 31', 'reason 32'], 'False first, by namespace/name');
  t.ok(v.failing.every((f) => /^reason \d+$/.test(f.reason)), 'ten failures before any error');
  const errorsFirst = releaseVerdict(RELEASE, liveInputs([validation('v', entries.filter((e) => e.verificationStatus !== 'False'), '2')], modules).inputs);
  t.match(errorsFirst.failing[0], { reason: 'error (retried): registry answered 503' }, 'then errors');
  const pending = releaseVerdict(RELEASE, liveInputs([validation('v', entries.filter((e) => e.verificationStatus === 'Unknown'), '3')], modules).inputs);
  t.match(pending.failing[0], { name: 'mod-0', reason: 'not validated yet' });
  t.match(pending.failing[1], { name: 'mod-1', reason: 'pending (stage Image): waiting' });
  t.match(v.message, /has 40 of 40 Modules not verified: ns-30\/mod-30: reason 30; .*; and 37 more$/);
});

t.test('a reason is cut to 200 characters and kept on one line', async (t) => {
  const [m] = modulesOf(1);
  const { inputs } = liveInputs([validation('v', [entry(m!, 'False', `line one\n${'x'.repeat(400)}`)], '1')], [m!]);
  const [f] = releaseVerdict(RELEASE, inputs).failing;
  t.equal(f!.reason.length, 200);
  t.match(f!.reason, /^line one x+…$/);
});

t.test('a release that is not an image reference is not verified', async (t) => {
  const { inputs } = liveInputs([], modulesOf(1));
  t.match(releaseVerdict('quay.io/Not Valid', inputs), { verified: false, reason: 'InvalidReleaseImage', message: /is not an image reference/ });
});

t.test('a reference with both a tag and a digest is its digest', async (t) => {
  const modules = modulesOf(2);
  const v = validation('v', modules.map((m) => entry(m, 'True')), '1', `quay.io/openshift-release-dev/ocp-release:4.16.2-x86_64@${DIGEST}`);
  const { inputs } = liveInputs([v], modules);
  t.match(releaseVerdict(RELEASE, inputs), { verified: true, digest: DIGEST });
  const stale: GateInputs = { ...inputs, digestOf: () => `sha256:${'ef'.repeat(32)}` };
  t.match(releaseVerdict(`quay.io/openshift-release-dev/ocp-release:4.16.2-x86_64@${DIGEST}`, stale), { verified: true, digest: DIGEST }, 'the tag is not looked up');
});

t.test('suggested objects have valid names and name the release', async (t) => {
  t.equal(suggestedName(RELEASE, '4.16.2'), 'ocp-4-16-2');
  t.equal(suggestedName(RELEASE), 'ocp-release-abababababab');
  t.equal(suggestedName('quay.io/openshift-release-dev/ocp-release:4.16.2-X86_64'), 'ocp-4-16-2-x86-64');
  t.equal(suggestedName('registry:5000/ocp/release'), 'ocp-release');
  for (const n of [suggestedName(RELEASE, '4.16.0-0.nightly-2024-07-18-101010'.repeat(3)), suggestedName('r/x:' + 'A'.repeat(120))]) {
    t.match(n, /^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$/, n);
  }
  t.match(createCommand(RELEASE, '4.16.2'), `echo '{"apiVersion":"kmm.sigs.x-k8s.io/v1beta2","kind":"PreflightValidationOCP","metadata":{"name":"ocp-4-16-2"},"spec":{"releaseImage":"${RELEASE}"}}' | kubectl apply -f -`);
});
