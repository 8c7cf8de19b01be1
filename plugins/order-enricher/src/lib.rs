//! Order enricher: reads `order.*` events in JSON envelopes, adds the
//! region, tax and total to placed orders and routes each kind of event to
//! its own topic (`<prefix>.enriched` for placed orders, `<prefix>.cancelled`
//! for cancellations).
//!
//! Config (`[handler.config]`): `output_prefix` (default `orders`),
//! `tax_rate_percent` (default `20`).

use serde::{Deserialize, Serialize};
use weir_sdk::{log, Event, HandlerError, HandlerResult, Output};

/// An order as the shop publishes it.
#[derive(Debug, Deserialize)]
pub struct Order {
    pub order_id: String,
    pub customer_id: String,
    pub country: String,
    pub items: Vec<Item>,
}

/// One line of an order.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct Item {
    pub sku: String,
    pub quantity: u32,
    pub unit_price_cents: u64,
}

/// A placed order with what downstream services would otherwise look up.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct EnrichedOrder {
    pub order_id: String,
    pub customer_id: String,
    pub region: String,
    pub items: Vec<Item>,
    pub subtotal_cents: u64,
    pub tax_cents: u64,
    pub total_cents: u64,
}

/// A cancellation, routed on its own topic.
#[derive(Debug, Deserialize, Serialize, PartialEq)]
pub struct Cancellation {
    pub order_id: String,
    #[serde(default)]
    pub reason: String,
}

fn region(country: &str) -> Option<&'static str> {
    match country {
        "DE" | "FR" | "NL" | "ES" | "IT" | "IE" | "PL" => Some("eu"),
        "GB" | "NO" | "CH" => Some("europe-other"),
        "US" | "CA" | "MX" => Some("north-america"),
        "JP" | "KR" | "SG" | "AU" | "IN" => Some("apac"),
        _ => None,
    }
}

/// Enriches and routes one order event.
pub fn handle(event: Event) -> HandlerResult {
    let prefix = weir_sdk::config("output_prefix").unwrap_or_else(|| "orders".into());
    let tax_percent: u64 = match weir_sdk::config("tax_rate_percent") {
        Some(v) => v
            .parse()
            .map_err(|_| HandlerError::fatal(format!("tax_rate_percent {v:?} is not a number")))?,
        None => 20,
    };
    match event.event_type.as_str() {
        "order.placed" => {
            let order: Order = event.decode()?;
            let Some(region) = region(&order.country) else {
                return Err(HandlerError::fatal(format!(
                    "order {} ships to {:?}, which no region serves",
                    order.order_id, order.country
                )));
            };
            if order.items.is_empty() {
                return Err(HandlerError::fatal(format!(
                    "order {} has no items",
                    order.order_id
                )));
            }
            let subtotal: u64 = order
                .items
                .iter()
                .map(|i| i.unit_price_cents * u64::from(i.quantity))
                .sum();
            let tax = subtotal * tax_percent / 100;
            let enriched = EnrichedOrder {
                order_id: order.order_id.clone(),
                customer_id: order.customer_id.clone(),
                region: region.into(),
                items: order.items,
                subtotal_cents: subtotal,
                tax_cents: tax,
                total_cents: subtotal + tax,
            };
            log::debug(&format!(
                "order {} enriched for {region}",
                enriched.order_id
            ));
            Ok(vec![Output::json(
                &format!("{prefix}.enriched"),
                "order.enriched",
                &enriched,
            )?
            .with_key(order.customer_id)])
        }
        "order.cancelled" => {
            let c: Cancellation = event.decode()?;
            let key = event
                .key
                .clone()
                .unwrap_or_else(|| c.order_id.clone().into_bytes());
            Ok(vec![Output::json(
                &format!("{prefix}.cancelled"),
                "order.cancelled",
                &c,
            )?
            .with_key(key)])
        }
        other => Err(HandlerError::fatal(format!(
            "unexpected event type {other:?}"
        ))),
    }
}

weir_sdk::handler!(handle);

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn placed_order_is_enriched_with_region_and_tax() {
        let event = Event::json(
            "orders",
            "order.placed",
            &json!({"order_id": "o-1", "customer_id": "c-1", "country": "DE",
                    "items": [{"sku": "a", "quantity": 2, "unit_price_cents": 500}]}),
        )
        .unwrap();
        let out = handle(event).unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].topic, "orders.enriched");
        assert_eq!(out[0].key.as_deref(), Some(&b"c-1"[..]));
        let e: EnrichedOrder = serde_json::from_slice(&out[0].payload).unwrap();
        assert_eq!(
            (
                e.region.as_str(),
                e.subtotal_cents,
                e.tax_cents,
                e.total_cents
            ),
            ("eu", 1000, 200, 1200)
        );
    }

    #[test]
    fn unknown_country_is_fatal() {
        let event = Event::json(
            "orders",
            "order.placed",
            &json!({"order_id": "o-2", "customer_id": "c", "country": "AQ", "items": []}),
        )
        .unwrap();
        assert!(matches!(handle(event), Err(HandlerError::Fatal(m)) if m.contains("AQ")));
    }

    #[test]
    fn cancellation_goes_to_its_own_topic() {
        weir_sdk::testing::set_config("output_prefix", "shop");
        let event = Event::json("orders", "order.cancelled", &json!({"order_id": "o-3"})).unwrap();
        let out = handle(event).unwrap();
        assert_eq!(out[0].topic, "shop.cancelled");
    }
}
