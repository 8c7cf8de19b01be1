//! Order totals: keeps each customer's running total of placed orders in
//! the handler's state, and publishes `customer.tier-changed` when a total
//! crosses a tier threshold (silver, gold, platinum).
//!
//! Input: `order.placed` envelopes (`{"order_id", "customer_id",
//! "amount_cents"}`, keyed by customer) and `order.refunded` ones (the same
//! fields: the amount is taken off). An order id seen before is not counted
//! again (state keeps the last 100 order ids per customer), so an upstream
//! duplicate with a new envelope id does not inflate a total.
//!
//! Config (`[handler.config]`): `output_topic` (default
//! `customers.tiers`), `silver_cents` / `gold_cents` / `platinum_cents`
//! (defaults 10,000 / 50,000 / 200,000).

use serde::{Deserialize, Serialize};
use weir_sdk::{log, state, Event, HandlerError, HandlerResult, Output};

/// An order event as the shop publishes it.
#[derive(Debug, Deserialize)]
pub struct OrderEvent {
    pub order_id: String,
    pub customer_id: String,
    pub amount_cents: u64,
}

/// What the handler keeps per customer.
#[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Customer {
    pub total_cents: u64,
    pub orders: u64,
    /// The latest order ids, newest last.
    pub recent_orders: Vec<String>,
}

/// Published when a customer's tier changes.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct TierChanged {
    pub customer_id: String,
    pub from: String,
    pub to: String,
    pub total_cents: u64,
}

const RECENT: usize = 100;

fn threshold(name: &str, default: u64) -> u64 {
    weir_sdk::config(name)
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The tier of a total.
pub fn tier(total_cents: u64) -> &'static str {
    if total_cents >= threshold("platinum_cents", 200_000) {
        "platinum"
    } else if total_cents >= threshold("gold_cents", 50_000) {
        "gold"
    } else if total_cents >= threshold("silver_cents", 10_000) {
        "silver"
    } else {
        "standard"
    }
}

/// Adds (or, for a refund, takes off) one order.
pub fn handle(event: Event) -> HandlerResult {
    let refund = match event.event_type.as_str() {
        "order.placed" => false,
        "order.refunded" => true,
        other => {
            return Err(HandlerError::fatal(format!(
                "unexpected event type {other:?}"
            )))
        }
    };
    let order: OrderEvent = event.decode()?;
    let key = format!("customer:{}", order.customer_id);
    let mut customer: Customer = state::get(&key)?.unwrap_or_default();
    let seen = format!("{}{}", if refund { "-" } else { "" }, order.order_id);
    if customer.recent_orders.contains(&seen) {
        log::info(&format!("order {seen} already counted"));
        return Ok(Vec::new());
    }
    let before = tier(customer.total_cents);
    if refund {
        customer.total_cents = customer.total_cents.saturating_sub(order.amount_cents);
    } else {
        customer.total_cents += order.amount_cents;
        customer.orders += 1;
    }
    customer.recent_orders.push(seen);
    if customer.recent_orders.len() > RECENT {
        customer.recent_orders.remove(0);
    }
    state::set(&key, &customer)?;
    let after = tier(customer.total_cents);
    if before == after {
        return Ok(Vec::new());
    }
    let topic = weir_sdk::config("output_topic").unwrap_or_else(|| "customers.tiers".into());
    let changed = TierChanged {
        customer_id: order.customer_id.clone(),
        from: before.into(),
        to: after.into(),
        total_cents: customer.total_cents,
    };
    Ok(vec![Output::json(
        &topic,
        "customer.tier-changed",
        &changed,
    )?
    .with_key(order.customer_id)])
}

weir_sdk::handler!(handle);

#[cfg(test)]
mod tests {
    use super::*;
    use weir_sdk::testing;

    fn order(kind: &str, id: &str, cents: u64) -> Event {
        Event::json(
            "orders",
            kind,
            &serde_json::json!({"order_id": id, "customer_id": "c-1", "amount_cents": cents}),
        )
        .unwrap()
        .with_key("c-1")
    }

    #[test]
    fn a_total_crossing_a_threshold_changes_the_tier_once() {
        assert!(testing::call(handle, order("order.placed", "o-1", 6_000))
            .unwrap()
            .is_empty());
        let out = testing::call(handle, order("order.placed", "o-2", 6_000)).unwrap();
        let changed: TierChanged = serde_json::from_slice(&out[0].payload).unwrap();
        assert_eq!(
            (changed.from.as_str(), changed.to.as_str()),
            ("standard", "silver")
        );
        assert_eq!(out[0].event_type, "customer.tier-changed");
        // The same order again (a new envelope id) is not counted twice.
        assert!(testing::call(handle, order("order.placed", "o-2", 6_000))
            .unwrap()
            .is_empty());
        let c: Customer = state::get("customer:c-1").unwrap().unwrap();
        assert_eq!((c.total_cents, c.orders), (12_000, 2));
        // A refund takes it back below.
        let out = testing::call(handle, order("order.refunded", "o-2", 6_000)).unwrap();
        let changed: TierChanged = serde_json::from_slice(&out[0].payload).unwrap();
        assert_eq!(changed.to, "standard");
    }

    #[test]
    fn a_bad_event_leaves_the_state_alone() {
        let bad = Event::json("orders", "order.placed", &serde_json::json!({"x": 1})).unwrap();
        assert!(testing::call(handle, bad).is_err());
        assert!(testing::state().is_empty());
    }
}
