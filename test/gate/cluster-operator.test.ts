/**
 * What the kmm-preflight ClusterOperator says, as pure functions: which release is next, the
 * conditions for each verdict and for the server's health, and transition times kept across
 * passes. The writer itself runs against a real kube-apiserver in
 * test/e2e/upgrade-gates-cluster.test.ts.
 */
import t from 'tap';
import type { KubeObject } from '../../src/api/resources.ts';
import { desiredOperatorStatus, nextRelease, withTransitionTimes, type OperatorInputs } from '../../src/gate/cluster-operator.ts';
import type { ClusterVersion } from '../../src/gate/cluster-version.ts';
import type { GateInputs } from '../../src/gate/release-verdict.ts';

const D = (c: string) => `quay.io/openshift-release-dev/ocp-release@sha256:${c.repeat(64)}`;

const cv = (desiredUpdate?: Record<string, unknown>): ClusterVersion => ({
  spec: { clusterID: 'x', ...(desiredUpdate ? { desiredUpdate } : {}) },
  status: {
    desired: { version: '4.15.21', image: D('1') },
    availableUpdates: [{ version: '4.16.1', image: D('2') }],
    conditionalUpdates: [{ release: { version: '4.16.2', image: D('3') } }],
  },
});

function pfvo(name: string, image: string, created: string, modules: { name: string; ok: boolean }[] = []): KubeObject {
  return {
    apiVersion: 'kmm.sigs.x-k8s.io/v1beta2',
    kind: 'PreflightValidationOCP',
    metadata: { name, generation: 1, resourceVersion: `${name}-1`, creationTimestamp: created },
    spec: { releaseImage: image },
    status: {
      observedGeneration: 1,
      modules: modules.map((m) => ({ namespace: 'drivers', name: m.name, verificationStatus: m.ok ? 'True' : 'False', verificationStage: m.ok ? 'Done' : 'Requeued', statusReason: m.ok ? 'found' : 'image missing', lastTransitionTime: created })),
      conditions: [{ type: 'Verified', status: modules.every((m) => m.ok) ? 'True' : 'False', reason: 'x', message: '', lastTransitionTime: created }],
    },
  } as unknown as KubeObject;
}

function gate(validations: KubeObject[], moduleNames: string[]): GateInputs {
  const modules = moduleNames.map((name) => ({ metadata: { name, namespace: 'drivers' } }));
  return { validations: () => validations, modules: () => modules, digestOf: () => undefined };
}

const inputs = (g: GateInputs, extra: Partial<OperatorInputs> = {}): OperatorInputs => ({ gate: g, gateReady: true, namespace: 'kmm-preflight', version: '0.1.0', ...extra });
const upgradeable = (i: OperatorInputs) => desiredOperatorStatus(i).conditions.find((c) => c.type === 'Upgradeable')!;

t.test('the next release: a pending desired update, else the newest validation', async (t) => {
  const old = pfvo('old', D('4'), '2026-01-01T00:00:00Z');
  const newest = pfvo('newest', D('5'), '2026-02-01T00:00:00Z');
  t.same(nextRelease(cv(), [old, newest]), { image: D('5'), source: 'validation' });
  t.same(nextRelease(cv({ image: D('2'), version: '4.16.1' }), [old, newest]), { image: D('2'), version: '4.16.1', source: 'desiredUpdate' });
  t.same(nextRelease(cv({ version: '4.16.2' }), []), { image: D('3'), version: '4.16.2', source: 'desiredUpdate' }, 'a version through the conditional updates');
  t.same(nextRelease(cv({ image: D('1') }), [old]), { image: D('4'), source: 'validation' }, 'the release the cluster runs is not next');
  t.same(nextRelease(cv({ image: D('2'), mode: 'Preflight' }), [old]), { image: D('4'), source: 'validation' }, 'a Preflight-mode request is not an update');
  t.equal(nextRelease(undefined, []), undefined);
  const deleting = { ...newest, metadata: { ...newest.metadata, deletionTimestamp: '2026-03-01T00:00:00Z' } } as KubeObject;
  t.same(nextRelease(undefined, [old, deleting]), { image: D('4'), source: 'validation' }, 'an object being deleted is not the newest');
});

t.test('Upgradeable follows the verdict on the next release', async (t) => {
  const good = pfvo('to-4-16-1', D('2'), '2026-01-01T00:00:00Z', [{ name: 'a', ok: true }, { name: 'b', ok: true }]);
  const bad = pfvo('to-4-16-1', D('2'), '2026-01-01T00:00:00Z', [{ name: 'a', ok: true }, { name: 'b', ok: false }]);
  t.match(upgradeable(inputs(gate([good], ['a', 'b']))), { status: 'True', reason: 'AllModulesVerified' });
  const no = upgradeable(inputs(gate([bad], ['a', 'b'])));
  t.match(no, { status: 'False', reason: 'ModulesNotVerified', message: /drivers\/b: image missing/ });
  t.ok(no.message.length <= 1024, 'the message is bounded');
  t.match(upgradeable(inputs(gate([good], ['a', 'b', 'c']))), { status: 'False', message: /drivers\/c/ }, 'a Module without an entry is not verified');
  const pending = upgradeable(inputs(gate([good], ['a', 'b']), { clusterVersion: cv({ version: '4.16.2' }) }));
  t.match(pending, { status: 'False', reason: 'NoValidation', message: /desired update 4\.16\.2.*kubectl apply/ }, 'a pending update without a validation says which object to create');
});

t.test('no validation and no pending update: False while there are Modules, True without any', async (t) => {
  t.match(upgradeable(inputs(gate([], ['a']))), { status: 'False', reason: 'NoPreflightValidation', message: /Create a PreflightValidationOCP/ });
  t.match(upgradeable(inputs(gate([], []))), { status: 'True', reason: 'NoModules' });
  t.match(upgradeable(inputs(gate([], ['a']), { gateReady: false })), { status: 'False', reason: 'Starting' });
});

t.test('Available and Degraded report the server\'s own health; related objects list the validations', async (t) => {
  const healthy = desiredOperatorStatus(inputs(gate([pfvo('b', D('2'), '2026-01-01T00:00:00Z'), pfvo('a', D('3'), '2026-01-02T00:00:00Z')], [])));
  t.match(healthy.conditions, [{ type: 'Upgradeable' }, { type: 'Available', status: 'True' }, { type: 'Degraded', status: 'False' }, { type: 'Progressing', status: 'False' }]);
  t.ok(healthy.conditions.every((c) => c.message !== ''), 'no empty messages');
  t.same(healthy.relatedObjects, [
    { group: '', resource: 'namespaces', name: 'kmm-preflight' },
    { group: 'kmm.sigs.x-k8s.io', resource: 'preflightvalidationsocp', name: 'a' },
    { group: 'kmm.sigs.x-k8s.io', resource: 'preflightvalidationsocp', name: 'b' },
  ]);
  t.same(healthy.versions, [{ name: 'operator', version: '0.1.0' }]);
  const sick = desiredOperatorStatus(inputs(gate([], []), { problem: 'kmm-preflight is unhealthy: etcd unreachable' }));
  t.match(sick.conditions, [{ type: 'Upgradeable' }, { type: 'Available', status: 'False', message: /etcd unreachable/ }, { type: 'Degraded', status: 'True' }]);
});

t.test('transition times move only when a condition\'s status changes', async (t) => {
  const first = withTransitionTimes(desiredOperatorStatus(inputs(gate([], ['a']))), undefined, '2026-01-01T00:00:00Z');
  t.ok(first.conditions.every((c) => c.lastTransitionTime === '2026-01-01T00:00:00Z'));
  const same = withTransitionTimes(desiredOperatorStatus(inputs(gate([], ['a']))), first, '2026-01-02T00:00:00Z');
  t.same(same, first, 'nothing changed, nothing to write');
  const flipped = withTransitionTimes(desiredOperatorStatus(inputs(gate([], []))), first, '2026-01-03T00:00:00Z');
  t.equal(flipped.conditions.find((c) => c.type === 'Upgradeable')!.lastTransitionTime, '2026-01-03T00:00:00Z');
  t.equal(flipped.conditions.find((c) => c.type === 'Available')!.lastTransitionTime, '2026-01-01T00:00:00Z');
});
